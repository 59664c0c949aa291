"""The real node: kubelet, containerd, kube-proxy, CoreDNS and the registry on a bridge; what `down` undoes."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

from .build import PAUSE_IMAGE, binary
from .certs import kubeconfig_path, write_kubeconfig
from .config import (
    BLACKHOLES,
    BRIDGE,
    BRIDGE_ADDRESS,
    CACHE_DIR,
    COREDNS_HEALTH_PORT,
    HOST,
    KUBELET_HEALTHZ_PORT,
    KUBELET_PORT,
    NFT_TABLE,
    NODE_FIXED_PATHS,
    NODE_LABEL,
    NODE_NAME,
    NODE_POD_SUBNET,
    NODE_SYSCTLS,
    NODE_TAINT,
    PAUSE_DIR,
    PROXY_HEALTHZ_PORT,
    PROXY_METRICS_PORT,
    REGISTRY_PORT,
    STATE_DIR,
    die,
    run,
    write_if_changed,
)
from .nodes import wait_for
from .processes import Component, http_ok, running_pid, start, stop, stray_pids, terminate


def node_dir() -> Path:
    return STATE_DIR / "node"


def containerd_socket() -> Path:
    return node_dir() / "containerd.sock"


def registry_data_dir() -> Path:
    # Outside STATE_DIR: pushed images outlive `down`, as a registry's would.
    return CACHE_DIR / "registry-data"


def sh_ok(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def read_sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", *name.split(".")).write_text(value + "\n")


def host_record_path() -> Path:
    return STATE_DIR / "host-before-node.json"


def record_host_state() -> None:
    """What `down` restores: the sysctls and which fixed paths existed before the node ran."""
    if host_record_path().is_file():
        return
    record = {
        "sysctls": {name: read_sysctl(name) for name in NODE_SYSCTLS},
        "existing_paths": [path for path in NODE_FIXED_PATHS if Path(path).exists()],
    }
    host_record_path().write_text(json.dumps(record, indent=2))


def ensure_host_network() -> None:
    if not Path(f"/sys/class/net/{BRIDGE}").exists():
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    addresses = run(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE])
    if f" {BRIDGE_ADDRESS}/" not in addresses:
        run(["ip", "addr", "add", f"{BRIDGE_ADDRESS}/{NODE_POD_SUBNET.split('/')[1]}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    for destination in BLACKHOLES:
        if destination.removesuffix("/32") not in run(["ip", "route", "show", "type", "blackhole"]):
            run(["ip", "route", "add", "blackhole", destination])
    # Routed pod traffic (pod -> Service -> pod) needs forwarding; nothing may leave the bridge.
    write_sysctl("net.ipv4.ip_forward", "1")
    ruleset = f"""table inet {NFT_TABLE} {{
  chain forward {{
    type filter hook forward priority -10; policy accept;
    iifname "{BRIDGE}" oifname != "{BRIDGE}" counter drop
    oifname "{BRIDGE}" iifname != "{BRIDGE}" counter drop
  }}
}}
"""
    if not sh_ok("nft", "list", "table", "inet", NFT_TABLE):
        proc = subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, capture_output=True)
        if proc.returncode != 0:
            die(f"nft: {proc.stderr.strip()}")


def write_node_config() -> None:
    directory = node_dir()
    for sub in ("cni", "certs.d", "kubelet", "pod-logs"):
        (directory / sub).mkdir(parents=True, exist_ok=True)
    pki = STATE_DIR / "pki"
    write_kubeconfig(pki, directory / "kubelet.kubeconfig", user="kubelet")
    write_kubeconfig(pki, directory / "kube-proxy.kubeconfig", user="kube-proxy")
    write_if_changed(directory / "cni" / "10-phi3.conflist", json.dumps({
        "cniVersion": "1.0.0", "name": "phi3", "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(directory / "cni-ipam"),
                      "ranges": [[{"subnet": NODE_POD_SUBNET, "gateway": BRIDGE_ADDRESS}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "loopback"},
        ]}, indent=2))
    registry = f"{BRIDGE_ADDRESS}:{REGISTRY_PORT}"
    (directory / "certs.d" / registry).mkdir(parents=True, exist_ok=True)
    write_if_changed(directory / "certs.d" / registry / "hosts.toml",
        f'server = "http://{registry}"\n\n[host."http://{registry}"]\n  capabilities = ["pull", "resolve"]\n')
    runc = shutil.which("runc") or "/usr/sbin/runc"
    write_if_changed(directory / "containerd.toml", textwrap.dedent(f"""\
        version = 3
        root = "{directory / 'containerd-root'}"
        imports = []
        # These would write to fixed host paths (/opt/containerd, /var/run/nri) and the node needs none.
        disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.nri.v1.nri",
                            "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs"]
        state = "{directory / 'containerd-state'}"

        [grpc]
          address = "{containerd_socket()}"

        [ttrpc]
          address = "{directory / 'containerd.sock.ttrpc'}"

        [plugins."io.containerd.cri.v1.images"]
          snapshotter = "overlayfs"
          [plugins."io.containerd.cri.v1.images".pinned_images]
            sandbox = "{PAUSE_IMAGE}"
          [plugins."io.containerd.cri.v1.images".registry]
            config_path = "{directory / 'certs.d'}"

        [plugins."io.containerd.cri.v1.runtime"]
          # root here lacks CAP_SYS_RESOURCE: never lower a process's OOM score below ours.
          restrict_oom_score_adj = true
          netns_mounts_under_state_dir = true
          [plugins."io.containerd.cri.v1.runtime".containerd]
            default_runtime_name = "runc"
            [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
              runtime_type = "io.containerd.runc.v2"
              [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
                BinaryName = "{runc}"
                SystemdCgroup = false
          [plugins."io.containerd.cri.v1.runtime".cni]
            bin_dirs = ["/usr/lib/cni"]
            conf_dir = "{directory / 'cni'}"
        """))
    write_if_changed(directory / "resolv.conf", "# Pods use cluster DNS; nothing outside resolves here.\n")
    write_if_changed(directory / "kubelet.yaml", json.dumps({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": BRIDGE_ADDRESS, "port": KUBELET_PORT, "readOnlyPort": 0,
        "healthzBindAddress": HOST, "healthzPort": KUBELET_HEALTHZ_PORT,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False, "oomScoreAdj": 0,
        "makeIPTablesUtilChains": False, "protectKernelDefaults": False,
        "clusterDNS": [BRIDGE_ADDRESS], "clusterDomain": "cluster.local",
        "resolvConf": str(directory / "resolv.conf"),
        "containerRuntimeEndpoint": f"unix://{containerd_socket()}",
        "podLogsDir": str(directory / "pod-logs"),
        "registerWithTaints": [NODE_TAINT], "maxPods": 40, "serializeImagePulls": False,
        # A test machine's disk fills with images and models: never evict pods for it.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 99, "imageGCLowThresholdPercent": 98,
        "shutdownGracePeriod": "0s",
    }, indent=2))
    write_if_changed(directory / "kube-proxy.yaml", json.dumps({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "mode": "nftables", "hostnameOverride": NODE_NAME, "bindAddress": BRIDGE_ADDRESS,
        "clientConnection": {"kubeconfig": str(directory / "kube-proxy.kubeconfig")},
        "healthzBindAddress": f"{HOST}:{PROXY_HEALTHZ_PORT}", "metricsBindAddress": f"{HOST}:{PROXY_METRICS_PORT}",
        "clusterCIDR": NODE_POD_SUBNET,
        # NodePorts answer on the bridge only, never on the machine's own network.
        "nodePortAddresses": [f"{BRIDGE_ADDRESS}/32"],
        # Pod -> Service -> pod on one bridge returns through the host only when masqueraded.
        "nftables": {"masqueradeAll": True},
        # Leave the host's conntrack settings alone.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }, indent=2))
    write_if_changed(directory / "Corefile", textwrap.dedent(f"""\
        .:53 {{
            bind {BRIDGE_ADDRESS}
            errors
            health {HOST}:{COREDNS_HEALTH_PORT}
            kubernetes cluster.local in-addr.arpa ip6.arpa {{
                kubeconfig {kubeconfig_path()} phi3-local
                pods insecure
                fallthrough in-addr.arpa ip6.arpa
            }}
            cache 5
        }}
        """))
    write_if_changed(directory / "registry.yaml", json.dumps({
        "version": 0.1, "log": {"level": "warn", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(registry_data_dir())}, "delete": {"enabled": True}},
        "http": {"addr": f"{BRIDGE_ADDRESS}:{REGISTRY_PORT}"},
    }, indent=2))


def node_components() -> list[Component]:
    directory = node_dir()
    return [
        Component("registry", [binary("registry"), "serve", str(directory / "registry.yaml")],
                  lambda: http_ok(f"http://{BRIDGE_ADDRESS}:{REGISTRY_PORT}/v2/")),
        Component("containerd", [binary("containerd"), f"--config={directory / 'containerd.toml'}"],
                  lambda: sh_ok(binary("ctr"), f"--address={containerd_socket()}", "version")),
        Component("coredns", [binary("coredns"), "-conf", str(directory / "Corefile")],
                  lambda: http_ok(f"http://{HOST}:{COREDNS_HEALTH_PORT}/health")),
        Component("kubelet", [
            binary("kubelet"), f"--config={directory / 'kubelet.yaml'}",
            f"--kubeconfig={directory / 'kubelet.kubeconfig'}", f"--root-dir={directory / 'kubelet'}",
            f"--hostname-override={NODE_NAME}", f"--node-ip={BRIDGE_ADDRESS}",
            f"--node-labels={NODE_LABEL[0]}={NODE_LABEL[1]},phi3.ai/hardware=cpu",
        ], lambda: http_ok(f"http://{HOST}:{KUBELET_HEALTHZ_PORT}/healthz")),
        Component("kube-proxy", [binary("kube-proxy"), f"--config={directory / 'kube-proxy.yaml'}"],
                  lambda: http_ok(f"http://{HOST}:{PROXY_HEALTHZ_PORT}/healthz")),
    ]


def ctr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("ctr"), f"--address={containerd_socket()}", "-n", "k8s.io", *args],
                          text=True, capture_output=True)


def import_pause_image() -> None:
    if PAUSE_IMAGE in ctr("images", "ls", "-q").stdout.split():
        return
    proc = ctr("images", "import", "--platform", "linux/amd64", str(PAUSE_DIR / "pause.oci.tar"))
    if proc.returncode != 0:
        die(f"ctr images import of the pause image failed: {proc.stderr.strip()}")


def real_node_ready() -> bool:
    proc = subprocess.run([binary("kubectl"), f"--kubeconfig={kubeconfig_path()}", "get", "node", NODE_NAME,
                           "-o", "json"], capture_output=True, text=True)
    if proc.returncode != 0:
        return False
    conditions = json.loads(proc.stdout).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def node_up() -> None:
    write_node_config()
    for component in node_components():
        start(component)
        if component.name == "containerd":
            import_pause_image()
    wait_for(f"node {NODE_NAME} to be Ready", real_node_ready)


def node_pods_gone() -> bool:
    proc = subprocess.run([binary("kubectl"), f"--kubeconfig={kubeconfig_path()}", "get", "pods", "-A",
                           f"--field-selector=spec.nodeName={NODE_NAME}", "-o", "name"],
                          capture_output=True, text=True, timeout=30)
    return proc.returncode != 0 or not proc.stdout.strip()


def drain_node() -> None:
    """Delete the node's pods through the API while the kubelet still runs, so it tears them down."""
    if running_pid("kubelet") is None or running_pid("kube-apiserver") is None:
        return
    base = [binary("kubectl"), f"--kubeconfig={kubeconfig_path()}"]
    subprocess.run([*base, "cordon", NODE_NAME], capture_output=True, timeout=30)
    subprocess.run([*base, "delete", "pods", "-A", f"--field-selector=spec.nodeName={NODE_NAME}",
                    "--grace-period=1", "--wait=false"], capture_output=True, timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not node_pods_gone():
        time.sleep(0.5)


def kubepods_cgroups() -> list[Path]:
    """Every cgroup the kubelet made (cgroup v1: one tree per controller), deepest first."""
    found: list[Path] = []
    root = Path("/sys/fs/cgroup")
    for top in root.glob("*/kubepods*"):
        found.extend(p for p in top.rglob("*") if p.is_dir())
        found.append(top)
    for top in root.glob("kubepods*"):
        found.extend(p for p in top.rglob("*") if p.is_dir())
        found.append(top)
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def kill_cgroup_processes() -> None:
    pids: set[int] = set()
    for group in kubepods_cgroups():
        with contextlib.suppress(OSError):
            pids.update(int(line) for line in (group / "cgroup.procs").read_text().split())
    terminate(sorted(pids))


def node_mounts() -> list[str]:
    marker = str(node_dir())
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point.startswith(marker) or mount_point.startswith("/run/containerd"):
            mounts.append(mount_point)
    return sorted(set(mounts), key=len, reverse=True)


def unmount_node() -> None:
    for _ in range(3):
        mounts = node_mounts()
        if not mounts:
            return
        for mount_point in mounts:
            if not sh_ok("umount", mount_point):
                sh_ok("umount", "-l", mount_point)


def node_down() -> None:
    drain_node()
    for name in ("kubelet", "coredns"):
        stop(name)
    if Path(binary("kube-proxy")).is_file():
        subprocess.run([binary("kube-proxy"), "--cleanup", f"--config={node_dir() / 'kube-proxy.yaml'}"],
                       capture_output=True, timeout=60)
    stop("kube-proxy")
    stop("containerd")
    stop("registry")
    # Shims and container processes outlive containerd; the kubepods cgroups hold what is left.
    terminate([pid for pid in stray_pids() if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(
        binary("containerd-shim-runc-v2").encode())])
    kill_cgroup_processes()
    unmount_node()
    for group in kubepods_cgroups():
        with contextlib.suppress(OSError):
            group.rmdir()
    for link in Path("/sys/class/net").iterdir():
        if link.name == BRIDGE or (link / "brport" / "bridge").resolve().name == BRIDGE:
            sh_ok("ip", "link", "delete", link.name)
    for destination in BLACKHOLES:
        sh_ok("ip", "route", "delete", "blackhole", destination)
    sh_ok("nft", "delete", "table", "inet", NFT_TABLE)
    restore_host_state()
    shutil.rmtree(node_dir() / "containerd-state", ignore_errors=True)
    shutil.rmtree(node_dir() / "kubelet", ignore_errors=True)
    shutil.rmtree(node_dir() / "cni-ipam", ignore_errors=True)


def restore_host_state() -> None:
    try:
        record = json.loads(host_record_path().read_text())
    except (OSError, ValueError):
        return
    for name, value in record["sysctls"].items():
        if value is not None:
            write_sysctl(name, value)
    for path in NODE_FIXED_PATHS:
        if path not in record["existing_paths"]:
            target = Path(path)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
    host_record_path().unlink()
