"""A real single-machine Kubernetes control plane on 127.0.0.1.

Runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
(fake nodes whose pods become Running/Ready). Every binary is built from its Go
module at a pinned version and cached under ~/.cache/phi3-operator/, keyed by
version, so only the first `build` is slow.

    hack/localcluster build    build and cache the binaries `up` needs (idempotent; --test-tools: the fault
                               tests' Toxiproxy too, which `which` otherwise builds when first asked for)
    hack/localcluster up       start everything (idempotent); last line: export KUBECONFIG=...
    hack/localcluster status   what runs
    hack/localcluster down     stop every process it started
    hack/localcluster env      shell exports: PATH with the cached binaries, KUBECONFIG
    hack/localcluster which X  path of a cached binary (kubectl, helm, etcd, toxiproxy-server, ...)
    hack/localcluster build-buildkit   build and cache buildkitd, buildctl, rootlesskit; prints their folder
    hack/localcluster build-prometheus build and cache prometheus; prints its folder
    hack/localcluster build-knative    build and cache Knative Serving's controller, webhook, activator,
                               autoscaler and queue; prints their folder
    hack/localcluster knative up|down  install Knative Serving on the real node (built, packaged with `hack/images
                               build knative-serving` and pushed when first asked for): Revisions of a
                               Configuration scale to and from zero, no Route or ingress; `down` removes it
                               (`down` of the cluster drops it with the cluster)
    hack/localcluster firewall up|down enforce NetworkPolicies on the real node (kube-router as a firewall
                               only, beside kube-proxy; built and cached when first asked for); `down` removes
                               its rules and sets back what it changed (`down` of the cluster does too)

Stdlib only: it must run before the project's virtualenv exists.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .addons.buildkit import build_buildkit
from .addons.firewall import cmd_firewall_down, cmd_firewall_up
from .addons.knative import build_knative, cmd_knative_down, cmd_knative_up, knative_cluster_down
from .addons.prometheus import build_prometheus
from .addons.toxiproxy import build_toxiproxy
from .build import binaries_built, binary, build_cluster_binaries, build_pause, kwok_stages_file, write_kwok_stages
from .certs import kubeconfig_path, make_pki, write_kubeconfig
from .config import (
    BIN_DIRS,
    BINARIES,
    CLUSTER_BIN_DIR,
    NODE_BIN_DIRS,
    NODE_BINARIES,
    PAUSE_DIR,
    STATE_DIR,
    TEST_BINARIES,
    TOXIPROXY_BIN_DIR,
    die,
    log,
    real_node_enabled,
)
from .nodes import NODES, default_service_account, kubectl, nodes_ready, wait_for
from .processes import AUDIT_POLICY, components, running_pid, start, stop, stray_pids, terminate
from .realnode import ensure_host_network, node_components, node_down, node_up, record_host_state


def cmd_build(test_tools: bool = False) -> None:
    """What `up` needs; with `test_tools`, the fault tests' tools too (`which` builds one when asked for it,
    so `make demo` on a fresh machine does not wait for them)."""
    if shutil.which("go") is None:
        die("Go is required to build the control-plane binaries (https://go.dev/doc/install)")
    steps: list[tuple[Path, Callable[[], None]]] = [(CLUSTER_BIN_DIR, build_cluster_binaries)]
    if real_node_enabled():
        steps.append((PAUSE_DIR, build_pause))
    if test_tools:
        steps.append((TOXIPROXY_BIN_DIR, build_toxiproxy))
    for bin_dir, step in steps:
        wanted = [name for name, where in {**BINARIES, **NODE_BINARIES, **TEST_BINARIES}.items() if where == bin_dir]
        if bin_dir.is_dir() and not all((bin_dir / name).is_file() for name in wanted):
            log(f"{bin_dir.name} is incomplete (an interrupted build?): building it again")
            shutil.rmtree(bin_dir)
        if bin_dir.is_dir():
            if bin_dir == CLUSTER_BIN_DIR and not kwok_stages_file().is_file():
                write_kwok_stages()
            continue
        log(f"building {bin_dir.name} (cached in {bin_dir}; the first build takes minutes)")
        started = time.monotonic()
        step()
        log(f"built {bin_dir.name} in {time.monotonic() - started:.0f}s")


def cmd_up() -> None:
    if not binaries_built():
        cmd_build()
    started = time.monotonic()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    make_pki(STATE_DIR / "pki")
    write_kubeconfig(STATE_DIR / "pki")
    (STATE_DIR / "audit-policy.yaml").write_text(AUDIT_POLICY)
    if real_node_enabled():
        record_host_state()
        ensure_host_network()
    for component in components():
        if component.name == "kwok":
            kubectl("apply", "--server-side", "--field-manager=localcluster", "-f", "-",
                    stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": NODES}))
        start(component)
    wait_for("kwok nodes to be Ready", nodes_ready)
    wait_for("the controller-manager to create the default ServiceAccount", default_service_account)
    if real_node_enabled():
        node_up()
    log(f"cluster ready in {time.monotonic() - started:.1f}s")
    print(f"export KUBECONFIG={kubeconfig_path()}")


def cmd_down() -> None:
    knative_cluster_down()
    cmd_firewall_down()
    if real_node_enabled():
        node_down()
    for component in reversed(components()):
        stop(component.name)
    terminate(stray_pids())
    left = stray_pids()
    if left:
        die(f"processes still running: {left}")
    # The cluster is disposable: the next `up` starts from an empty etcd.
    for sub in ("etcd", "pids", "audit.log"):
        path = STATE_DIR / sub
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    log("stopped")


def cmd_status() -> int:
    all_up = True
    for component in components() + (node_components() if real_node_enabled() else []):
        pid = running_pid(component.name)
        healthy = pid is not None and component.health()
        all_up &= healthy
        state = "healthy" if healthy else ("running, not healthy" if pid else "stopped")
        print(f"{component.name:<24} {state}" + (f" (pid {pid})" if pid else ""))
    print(f"{'binaries':<24} {'built' if binaries_built() else 'missing (run: hack/localcluster build)'}")
    if all_up:
        print(f"export KUBECONFIG={kubeconfig_path()}")
    return 0 if all_up else 3


def cmd_env() -> None:
    path = ":".join(str(d) for d in (*BIN_DIRS, *(NODE_BIN_DIRS if real_node_enabled() else ())))
    print(f"export PATH={path}:$PATH")
    print(f"export KUBECONFIG={kubeconfig_path()}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "build":
        cmd_build(test_tools="--test-tools" in rest)
    elif command == "up":
        cmd_up()
    elif command == "down":
        cmd_down()
    elif command == "status":
        return cmd_status()
    elif command == "env":
        cmd_env()
    elif command == "build-buildkit":
        print(build_buildkit())
    elif command == "build-prometheus":
        print(build_prometheus())
    elif command == "build-knative":
        print(build_knative())
    elif command == "knative" and rest in (["up"], ["down"]):
        cmd_knative_up() if rest == ["up"] else cmd_knative_down()
    elif command == "firewall" and rest in (["up"], ["down"]):
        cmd_firewall_up() if rest == ["up"] else cmd_firewall_down()
    elif command == "which" and len(rest) == 1 and rest[0] in {**BINARIES, **NODE_BINARIES, **TEST_BINARIES}:
        wants_test_tool = rest[0] in TEST_BINARIES
        if not binaries_built(test_tools=wants_test_tool):
            cmd_build(test_tools=wants_test_tool)
        print(binary(rest[0]))
    elif command == "kubeconfig":
        print(kubeconfig_path())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0
