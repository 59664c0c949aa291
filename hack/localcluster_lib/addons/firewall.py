"""kube-router as the real node's NetworkPolicy firewall (`firewall up|down`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from ..build import go_env
from ..certs import kubeconfig_path
from ..config import (
    CACHE_DIR,
    FIREWALL_SYSCTLS,
    HOST,
    IPTABLES_TABLES,
    KUBE_ROUTER_DIR,
    KUBE_ROUTER_HEALTH_PORT,
    KUBE_ROUTER_NETLINK,
    KUBE_ROUTER_VERSION,
    NODE_NAME,
    STATE_DIR,
    die,
    log,
    real_node_enabled,
    run,
)
from ..processes import Component, http_ok, running_pid, start, stop
from ..realnode import read_sysctl, sh_ok, write_sysctl


def build_kube_router() -> Path:
    """kube-router, static, through a wrapper module whose replace gives netlink a release the proxy serves."""
    built = KUBE_ROUTER_DIR / "kube-router"
    if built.is_file():
        return built
    log(f"building {KUBE_ROUTER_DIR.name} (cached in {KUBE_ROUTER_DIR}; the first build takes minutes)")
    started = time.monotonic()
    src = CACHE_DIR / "src" / KUBE_ROUTER_DIR.name
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(
        "module phi3operator.local/kuberouterbuild\n\ngo 1.26\n\n"
        f"require github.com/cloudnativelabs/kube-router/v2 {KUBE_ROUTER_VERSION}\n\n"
        f"replace github.com/vishvananda/netlink => github.com/vishvananda/netlink {KUBE_ROUTER_NETLINK}\n"
    )
    (src / "tools.go").write_text(
        '//go:build tools\n\npackage tools\n\nimport _ "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"\n'
    )
    run(["go", "mod", "tidy"], cwd=src, env=go_env())
    out = KUBE_ROUTER_DIR.with_name(KUBE_ROUTER_DIR.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "kube-router"),
         "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"], cwd=src, env=go_env())
    out.rename(KUBE_ROUTER_DIR)
    log(f"built {KUBE_ROUTER_DIR.name} in {time.monotonic() - started:.0f}s")
    return built


def firewall_record_path() -> Path:
    return STATE_DIR / "host-before-firewall.json"


def firewall_component() -> Component:
    return Component("kube-router", [
        str(KUBE_ROUTER_DIR / "kube-router"), f"--kubeconfig={kubeconfig_path()}", f"--hostname-override={NODE_NAME}",
        "--run-firewall=true", "--run-router=false", "--run-service-proxy=false",
        f"--health-addr={HOST}", f"--health-port={KUBE_ROUTER_HEALTH_PORT}", "--metrics-port=0",
        "--iptables-sync-period=30s",
    ], lambda: http_ok(f"http://{HOST}:{KUBE_ROUTER_HEALTH_PORT}/healthz"))


def cmd_firewall_up() -> None:
    """kube-router as a NetworkPolicy firewall only: kube-proxy keeps Services, the CNI bridge keeps routes."""
    if not real_node_enabled() or running_pid("kubelet") is None:
        die("the firewall guards the real node: run `hack/localcluster up` first")
    missing = [tool for tool in ("ipset", "iptables") if shutil.which(tool) is None]
    if missing:
        die(f"kube-router needs {' and '.join(missing)}: apt-get install {' '.join(missing)}")
    build_kube_router()
    if not firewall_record_path().is_file():
        firewall_record_path().write_text(json.dumps({
            "sysctls": {name: read_sysctl(name) for name in FIREWALL_SYSCTLS},
            "iptables_tables": [table for table in IPTABLES_TABLES if sh_ok("nft", "list", "table", *table.split())],
        }))
    for name in FIREWALL_SYSCTLS:
        if read_sysctl(name) is None:
            die(f"{name} is missing: the kernel needs br_netfilter")
        write_sysctl(name, "1")
    start(firewall_component())


def cmd_firewall_down() -> None:
    stop("kube-router")
    if (KUBE_ROUTER_DIR / "kube-router").is_file() and firewall_record_path().is_file():
        # Its iptables chains and ipsets outlive it; --cleanup-config removes them.
        subprocess.run([str(KUBE_ROUTER_DIR / "kube-router"), "--cleanup-config", f"--kubeconfig={kubeconfig_path()}"],
                       capture_output=True, timeout=120)
    try:
        record = json.loads(firewall_record_path().read_text())
    except (OSError, ValueError):
        return
    for name, value in record["sysctls"].items():
        if value is not None:
            write_sysctl(name, value)
    # iptables-nft leaves its (by now empty) filter tables behind; those that were not there go.
    for table in IPTABLES_TABLES:
        if table not in record["iptables_tables"]:
            sh_ok("nft", "delete", "table", *table.split())
    firewall_record_path().unlink()
