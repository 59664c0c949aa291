"""Versions, cache dirs (and so cache keys), ports and paths; `log`, `die` and `run`.

Every cache dir name is derived here, once, at import time: a change to one of these expressions makes CI
rebuild the Go binaries.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
# The rest are built in one Go module graph with Kubernetes (build_cluster_binaries), so the libraries
# they share compile once: each is the newest release whose k8s.io/* requirement is at most Kubernetes' own.
ETCD_VERSION = "v3.6.16"
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v3.21.4"
# The real node: kubelet and kube-proxy come from k8s.io/kubernetes at KUBERNETES_VERSION.
CONTAINERD_VERSION = "v2.3.7"
COREDNS_VERSION = "v1.14.7"
REGISTRY_VERSION = "v3.1.2"
# Test tools: built and cached like the rest, never started by `up` (the fault tests start and stop them).
TOXIPROXY_VERSION = "v2.12.0"
# The in-cluster image builder, built only when asked for (`build-buildkit`: `hack/images build buildkit`
# packages it as the air-gapped mirror of moby/buildkit:BUILDKIT_VERSION-rootless that the chart can name).
BUILDKIT_VERSION = "v0.34.2"
ROOTLESSKIT_VERSION = "v2.3.6"
# The NetworkPolicy enforcer the tests run on the real node, built only when asked for (`firewall up`).
# Its go.mod pins a netlink pseudo-version the module proxy here refuses; the last release serves it.
KUBE_ROUTER_VERSION = "v2.10.0"
KUBE_ROUTER_NETLINK = "v1.3.1"
# The tests' Prometheus (it scrapes a model from the monitoring namespace through its NetworkPolicy), built
# only when asked for (`build-prometheus`; `hack/images build prometheus` packages it). Without the
# `builtinassets` tag, which needs the web UI prebuilt with npm: the UI is not what the tests use.
PROMETHEUS_VERSION = "v0.316.0"
# Knative Serving, built only when asked for (`build-knative`; `knative up` packages it with `hack/images build
# knative-serving` and installs it on the real node): Revisions that scale to and from zero, no Route or ingress.
KNATIVE_SERVING_VERSION = "v0.50.0"

CACHE_DIR = Path(os.environ.get("PHI3_CACHE_DIR", Path.home() / ".cache" / "phi3-operator"))
STATE_DIR = Path(os.environ.get("PHI3_LOCALCLUSTER_DIR", CACHE_DIR / "localcluster"))

ETCD_MODULES = ("server/v3", "api/v3", "client/pkg/v3", "client/v3", "pkg/v3")
CLUSTER_MODULES = {
    "k8s.io/kubernetes": KUBERNETES_VERSION,
    **{f"go.etcd.io/etcd/{module}": ETCD_VERSION for module in ETCD_MODULES},
    "sigs.k8s.io/kwok": KWOK_VERSION,
    "helm.sh/helm/v3": HELM_VERSION,
    "github.com/containerd/containerd/v2": CONTAINERD_VERSION,
    "github.com/coredns/coredns": COREDNS_VERSION,
    "github.com/distribution/distribution/v3": REGISTRY_VERSION,
}
# Binary name -> Go package; `./x` are this build's own main packages (WRAPPER_MAINS).
CONTROL_PLANE_PACKAGES = {
    **{name: f"k8s.io/kubernetes/cmd/{name}"
       for name in ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")},
    "etcd": "./etcd",
    "kwok": "sigs.k8s.io/kwok/cmd/kwok",
    "helm": "helm.sh/helm/v3/cmd/helm",
}
NODE_PACKAGES = {
    "kubelet": "k8s.io/kubernetes/cmd/kubelet",
    "kube-proxy": "k8s.io/kubernetes/cmd/kube-proxy",
    **{name: f"github.com/containerd/containerd/v2/cmd/{name}"
       for name in ("containerd", "ctr", "containerd-shim-runc-v2")},
    "coredns": "./coredns",
    "registry": "./registry",
}
# What the Corefile `up` writes uses, in CoreDNS's own directive order; the rest of its ~60 plugins (and the cloud
# SDKs they pull in) stay out of the build.
COREDNS_PLUGINS = ("bind", "health", "errors", "cache", "kubernetes")
WRAPPER_MAINS = {
    # etcd's server module carries local `replace` lines, so it is built from a main of ours.
    "etcd": """\
package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
""",
    "coredns": textwrap.dedent("""\
        package main

        import (
        \t"github.com/coredns/coredns/core/dnsserver"
        \t"github.com/coredns/coredns/coremain"
        %s)

        func init() { dnsserver.Directives = []string{%s} }

        func main() { coremain.Run() }
        """) % ("".join(f'\t_ "github.com/coredns/coredns/plugin/{plugin}"\n' for plugin in COREDNS_PLUGINS),
                ", ".join(f'"{plugin}"' for plugin in COREDNS_PLUGINS)),
    # The registry's own main also links the S3, Azure and GCS drivers; the local one needs the filesystem.
    "registry": """\
package main

import (
\t"github.com/distribution/distribution/v3/registry"
\t_ "github.com/distribution/distribution/v3/registry/storage/driver/filesystem"
)

func main() { _ = registry.RootCmd.Execute() }
""",
}
CONTAINERD_BUILD_TAGS = "no_btrfs no_devmapper no_zfs"
CLUSTER_BUILD_KEY = hashlib.sha256(json.dumps(
    [CLUSTER_MODULES, CONTROL_PLANE_PACKAGES, NODE_PACKAGES, WRAPPER_MAINS, CONTAINERD_BUILD_TAGS]).encode()
).hexdigest()[:12]
CLUSTER_BIN_DIR = CACHE_DIR / f"cluster-{KUBERNETES_VERSION}-{CLUSTER_BUILD_KEY}"
PAUSE_DIR = CACHE_DIR / "pause-1"
TOXIPROXY_BIN_DIR = CACHE_DIR / f"toxiproxy-{TOXIPROXY_VERSION}"
BUILDKIT_BIN_DIR = CACHE_DIR / f"buildkit-{BUILDKIT_VERSION}-rootlesskit-{ROOTLESSKIT_VERSION}"
KUBE_ROUTER_DIR = CACHE_DIR / f"kube-router-{KUBE_ROUTER_VERSION}-netlink-{KUBE_ROUTER_NETLINK}"
PROMETHEUS_DIR = CACHE_DIR / f"prometheus-{PROMETHEUS_VERSION}"
KNATIVE_SERVING_DIR = CACHE_DIR / f"knative-serving-{KNATIVE_SERVING_VERSION}"
BIN_DIRS = (CLUSTER_BIN_DIR,)
NODE_BIN_DIRS = (PAUSE_DIR,)

BINARIES = dict.fromkeys(CONTROL_PLANE_PACKAGES, CLUSTER_BIN_DIR)
NODE_BINARIES = {**dict.fromkeys(NODE_PACKAGES, CLUSTER_BIN_DIR), "pause": PAUSE_DIR}
TEST_BINARIES = {
    "toxiproxy-server": TOXIPROXY_BIN_DIR,
    "toxiproxy-cli": TOXIPROXY_BIN_DIR,
}
BUILDKIT_BINARIES = {"buildkitd": BUILDKIT_BIN_DIR, "buildctl": BUILDKIT_BIN_DIR, "rootlesskit": BUILDKIT_BIN_DIR}

HOST = "127.0.0.1"
PORT_BASE = int(os.environ.get("PHI3_LOCALCLUSTER_PORT_BASE", "36400"))
# Every component is a Go program sharing a couple of cores with the tests; memory is plentiful,
# so they collect garbage less often than Go's default (GOGC=100) and leave the CPU to the work.
GO_GC_PERCENT = os.environ.get("PHI3_LOCALCLUSTER_GOGC", "400")
ETCD_CLIENT_PORT = PORT_BASE + 79
ETCD_PEER_PORT = PORT_BASE + 80
APISERVER_PORT = PORT_BASE + 43
KCM_PORT = PORT_BASE + 57
SCHEDULER_PORT = PORT_BASE + 59
KWOK_PORT = PORT_BASE + 47

SERVICE_CIDR = "10.96.0.0/16"
# kwok hands its fake pods addresses from here and gives its nodes one address; nothing answers there,
# so with a real node (and so routing) both are blackholed: no packet for them leaves the machine.
POD_CIDR = "10.244.0.0/16"
KWOK_NODE_IP = "10.0.0.1"
BLACKHOLES = (POD_CIDR, f"{KWOK_NODE_IP}/32")

# The real node. Its pods live on a bridge whose address is also where the host serves them:
# the API server, the registry, cluster DNS (and, in tests, MLflow) bind there, never to 0.0.0.0.
# Pod traffic never leaves the machine: no masquerade, and a forward rule drops anything routed out.
NODE_NAME = "phi3-node-0"
NODE_LABEL = ("phi3.ai/node", "real")
NODE_TAINT = {"key": "phi3.ai/node", "value": "real", "effect": "NoSchedule"}
BRIDGE = "phi3br0"
NODE_POD_SUBNET = "10.88.0.0/24"
BRIDGE_ADDRESS = "10.88.0.1"
REGISTRY_PORT = 5000
KUBELET_PORT = PORT_BASE + 50
KUBELET_HEALTHZ_PORT = PORT_BASE + 48
PROXY_HEALTHZ_PORT = PORT_BASE + 56
PROXY_METRICS_PORT = PORT_BASE + 55
COREDNS_HEALTH_PORT = PORT_BASE + 53
KUBE_ROUTER_HEALTH_PORT = PORT_BASE + 58
# Bridged pod-to-pod traffic reaches iptables (and so kube-router's policy chains) only with this on.
FIREWALL_SYSCTLS = ("net.bridge.bridge-nf-call-iptables",)
# The nftables tables kube-router's iptables (the nft backend) creates.
IPTABLES_TABLES = ("ip filter", "ip6 filter")
NFT_TABLE = "phi3-localcluster"
# What the kubelet, the CNI bridge plugin and we change; `down` puts back what `up` found.
NODE_SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops", "net.ipv4.ip_forward")
# Fixed paths the kubelet, containerd and the CNI plugins write whatever their configured dirs.
NODE_FIXED_PATHS = ("/var/lib/kubelet/device-plugins", "/var/lib/kubelet", "/var/log/containers", "/var/log/pods",
                    "/var/lib/cni", "/run/containerd", "/etc/cni/net.d/cni.lock", "/etc/cni")

START_DEADLINE_S = 120.0


def log(message: str) -> None:
    print(f"localcluster: {message}", file=sys.stderr, flush=True)


def die(message: str) -> None:
    log(f"error: {message}")
    sys.exit(1)


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, text=True, capture_output=True)
    if proc.returncode != 0:
        die(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def real_node_enabled() -> bool:
    """The real node needs root (mounts, cgroups, network); PHI3_LOCALCLUSTER_REAL_NODE=0 leaves it out."""
    return os.environ.get("PHI3_LOCALCLUSTER_REAL_NODE", "1") != "0"


def write_if_changed(path: Path, text: str) -> None:
    """Running components watch their files (kube-proxy exits when its config changes): a second `up`
    must not touch a file whose content is already right."""
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.rename(path)
