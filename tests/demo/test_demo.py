"""`make demo` and `make demo-down`, as a newcomer runs them: the answer comes from a real pod.

The demo runs on the machine's one local cluster (a machine has one real node: its bridge, cgroups
and fixed paths are the host's). When the suite's cluster already runs, `make demo`'s `up` must reuse
it, process for process; `make demo-down` then stops it, and this test checks that the host is left
as it was found: no process, mount, network namespace, veth, bridge, nftables table or cgroup of
the node remains, its fixed paths are gone and every sysctl it changed is back. tests/conftest.py
runs this file last, since it takes the cluster down.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.cluster import REPO_ROOT, localcluster
from tests.support.operator import stop_host_operators

pytestmark = pytest.mark.cluster

NODE_PROCESSES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubelet",
                  "kube-proxy", "containerd", "containerd-shim-runc-v2", "coredns", "registry")


def state_dir() -> Path:
    return Path(localcluster("kubeconfig").stdout.strip()).parent


def cluster_processes(state: Path) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = any(str(state).encode() in a for a in argv)
        if ours and Path(argv[0].decode(errors="replace")).name in NODE_PROCESSES:
            found.append(b" ".join(argv).decode(errors="replace")[:200])
    return found


def pids(state: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((state / "pids").glob("*.pid"))}


def host_leftovers(state: Path, baseline: dict[str, object]) -> list[str]:
    """Everything of the real node still on the host after `down`."""
    left = [f"process {p}" for p in cluster_processes(state)]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4]
        if mount_point.startswith((str(state), "/run/containerd", "/var/lib/kubelet", "/run/netns")):
            left.append(f"mount {mount_point}")
    links = subprocess.run(["ip", "-o", "link", "show"], text=True, capture_output=True, check=True).stdout
    left += [f"link {line.split(':')[1].strip()}" for line in links.splitlines()
             if "phi3br0" in line or "veth" in line]
    netns = subprocess.run(["ip", "netns", "list"], text=True, capture_output=True).stdout.split()
    left += [f"netns {name}" for name in netns if name.startswith("cni-")]
    tables = subprocess.run(["nft", "list", "tables"], text=True, capture_output=True, check=True).stdout
    left += [f"nft {line}" for line in tables.splitlines() if "kube-proxy" in line or "phi3" in line]
    iptables = subprocess.run(["iptables-save"], text=True, capture_output=True) if Path(
        "/usr/sbin/iptables-save").exists() else None
    if iptables is not None:
        left += [f"iptables {line}" for line in iptables.stdout.splitlines() if "KUBE-" in line or "CNI-" in line]
    routes = subprocess.run(["ip", "route", "show", "type", "blackhole"], text=True, capture_output=True).stdout
    left += [f"route {line}" for line in routes.splitlines() if "10.244." in line or "10.0.0.1" in line]
    left += [f"cgroup {group}" for group in Path("/sys/fs/cgroup").glob("*/kubepods*")]
    left += [f"cgroup {group}" for group in Path("/sys/fs/cgroup").glob("kubepods*")]
    existing = set(baseline["existing_paths"])  # type: ignore[arg-type]
    for path in ("/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/var/lib/cni", "/run/containerd",
                 "/etc/cni/net.d/cni.lock", "/etc/cni"):
        if path not in existing and Path(path).exists():
            left.append(f"path {path}")
    for name, value in baseline["sysctls"].items():  # type: ignore[attr-defined]
        now = Path("/proc/sys", *name.split(".")).read_text().strip()
        if value is not None and now != value:
            left.append(f"sysctl {name}={now} (was {value})")
    return left


def test_make_demo_answers_from_a_real_pod_and_demo_down_leaves_the_host_clean(tmp_path: Path) -> None:
    env = {**os.environ, "PHI3_DEMO_DIR": str(tmp_path / "demo")}
    # The demo installs the operator in the cluster; one the suite runs on the host would fight it.
    stop_host_operators()
    state = state_dir()
    already_up = localcluster("status", check=False).returncode == 0
    before = pids(state) if already_up else {}
    try:
        demo = subprocess.run(["make", "demo"], cwd=REPO_ROOT, env=env, text=True, capture_output=True, timeout=2400)
        output = demo.stdout + demo.stderr
        assert demo.returncode == 0, output[-6000:]
        print(output[-4000:])
        for expected in (
            "registered models:/phi3-mini/",
            "models:/phi3-mini@champion resolved to models:/phi3-mini/",
            "operator pod phi3-operator-",
            " on node phi3-node-0 (10.88.0.",
            "assistant: ",
            "streamed: ",
            "came from the runtime container of the pod above, through the Service",
            "model delivery: ImageVolume: pods mount 10.88.0.1:5000/demo/phi3-models/phi3-mini@sha256:",
            "event PodReady: pod phi3-mini-",
            "Deployment now serves models:/phi3-mini/",
            "event ModelVersionChanged: rolling from models:/phi3-mini/",
            "Clean up with: make demo-down",
        ):
            assert expected in output, f"{expected!r} missing from the demo output:\n{output[-6000:]}"
        if already_up:
            assert {k: v for k, v in pids(state).items() if k in before} == before, (
                "`make demo`'s `up` must reuse the running cluster")
        baseline = json.loads((state / "host-before-node.json").read_text())
    finally:
        down = subprocess.run(["make", "demo-down"], cwd=REPO_ROOT, env=env, text=True, capture_output=True,
                              timeout=600)
    assert down.returncode == 0, down.stdout + down.stderr
    assert host_leftovers(state, baseline) == []
    after = localcluster("status", check=False)
    assert after.returncode != 0 and "stopped" in after.stdout
