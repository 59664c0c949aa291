"""The control plane's processes: what each runs and how its health is checked; start, stop, pid files."""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .build import binary, kwok_stages_file
from .certs import api_host, kubeconfig_path
from .config import (
    APISERVER_PORT,
    BINARIES,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    GO_GC_PERCENT,
    HOST,
    KCM_PORT,
    KWOK_NODE_IP,
    KWOK_PORT,
    NODE_BINARIES,
    POD_CIDR,
    SCHEDULER_PORT,
    SERVICE_CIDR,
    START_DEADLINE_S,
    STATE_DIR,
    die,
    log,
    real_node_enabled,
)


@dataclass(frozen=True)
class Component:
    name: str
    argv: list[str]
    health: Callable[[], bool]


def pid_file(name: str) -> Path:
    return STATE_DIR / "pids" / f"{name}.pid"


def running_pid(name: str) -> int | None:
    try:
        pid = int(pid_file(name).read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    # A reused pid would belong to something that does not mention our state dir.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if str(STATE_DIR).encode() in cmdline else None


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def admin_tls() -> ssl.SSLContext:
    pki = STATE_DIR / "pki"
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return context


def insecure_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  # Writes only: tests and benchmarks count them to prove a no-op resync writes nothing.
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
"""


NODE_MONITOR_GRACE_S = 300


def components() -> list[Component]:
    pki = STATE_DIR / "pki"
    kubeconfig = str(kubeconfig_path())
    etcd_url = f"http://{HOST}:{ETCD_CLIENT_PORT}"
    return [
        Component("etcd", [
            binary("etcd"), "--name=local", f"--data-dir={STATE_DIR / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://{HOST}:{ETCD_PEER_PORT}",
            f"--initial-advertise-peer-urls=http://{HOST}:{ETCD_PEER_PORT}",
            f"--initial-cluster=local=http://{HOST}:{ETCD_PEER_PORT}",
            "--unsafe-no-fsync=true", "--quota-backend-bytes=8589934592", "--log-level=warn",
        ], lambda: http_ok(f"{etcd_url}/health")),
        Component("kube-apiserver", [
            binary("kube-apiserver"), f"--etcd-servers={etcd_url}",
            f"--bind-address={api_host()}", f"--advertise-address={api_host()}", f"--secure-port={APISERVER_PORT}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # A loopback address is not a valid endpoint for the `kubernetes` Service; the bridge's is.
            f"--endpoint-reconciler-type={'lease' if real_node_enabled() else 'none'}",
            # Logs, exec and port-forward dial the kubelet by address; there is no DNS for node names.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--kubelet-client-certificate={pki / 'admin.crt'}", f"--kubelet-client-key={pki / 'admin.key'}",
            f"--audit-policy-file={STATE_DIR / 'audit-policy.yaml'}",
            f"--audit-log-path={STATE_DIR / 'audit.log'}",
            "--audit-log-maxsize=200", "--audit-log-maxbackup=1",
            "--profiling=false",
        ], lambda: http_ok(f"https://{api_host()}:{APISERVER_PORT}/readyz", admin_tls())),
        Component("kube-controller-manager", [
            binary("kube-controller-manager"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={HOST}", f"--secure-port={KCM_PORT}", "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--use-service-account-credentials=true", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--controllers=*", "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10",
            "--kube-api-qps=200", "--kube-api-burst=400",
            # kwok renews its fake nodes' heartbeat about every 50 s, close to the default grace (50 s): under
            # load one renewal was late, the node controller marked every pod on the node NotReady, and kwok
            # never readies a pod again. No test needs a node's loss noticed quickly.
            f"--node-monitor-grace-period={NODE_MONITOR_GRACE_S}s",
        ], lambda: http_ok(f"https://{HOST}:{KCM_PORT}/healthz", insecure_tls())),
        Component("kube-scheduler", [
            binary("kube-scheduler"), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={HOST}", f"--secure-port={SCHEDULER_PORT}", "--leader-elect=false",
            "--kube-api-qps=200", "--kube-api-burst=400",
        ], lambda: http_ok(f"https://{HOST}:{SCHEDULER_PORT}/healthz", insecure_tls())),
        Component("kwok", [
            binary("kwok"), f"--kubeconfig={kubeconfig}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--cidr={POD_CIDR}", f"--node-ip={KWOK_NODE_IP}", f"--config={kwok_stages_file()}",
            f"--server-address={HOST}:{KWOK_PORT}",
        ], lambda: http_ok(f"http://{HOST}:{KWOK_PORT}/healthz")),
    ]


RUNNING_HEALTH_GRACE_S = 30.0


def start(component: Component) -> None:
    if running_pid(component.name) is not None:
        # A running component that is briefly unhealthy (kube-proxy behind on a sync under load) is
        # given time, not restarted: a second `up` must leave a working cluster as it is.
        deadline = time.monotonic() + RUNNING_HEALTH_GRACE_S
        while time.monotonic() < deadline:
            if component.health():
                return
            time.sleep(0.5)
        log(f"{component.name} runs but stayed unhealthy for {RUNNING_HEALTH_GRACE_S:.0f}s: restarting it")
    stop(component.name)
    logs = STATE_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{component.name}.log", "ab") as out:
        proc = subprocess.Popen(
            component.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=STATE_DIR,
            # The registry (distribution v3) exports traces to localhost:4318 unless told not to.
            env={**os.environ, "GOGC": GO_GC_PERCENT, "OTEL_TRACES_EXPORTER": "none"},
        )
    pid_file(component.name).parent.mkdir(parents=True, exist_ok=True)
    pid_file(component.name).write_text(str(proc.pid))
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (logs / f"{component.name}.log").read_text(errors="replace")[-3000:]
            die(f"{component.name} exited with {proc.returncode}; log tail:\n{tail}")
        if component.health():
            log(f"{component.name} is up (pid {proc.pid})")
            return
        time.sleep(0.25)
    die(f"{component.name} not healthy after {START_DEADLINE_S:.0f}s; see {logs / (component.name + '.log')}")


def stray_pids() -> list[int]:
    """Processes whose command line names our state dir, whether or not a pid file remains."""
    marker = str(STATE_DIR).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv0 = cmdline.split(b"\0", 1)[0]
        if marker in cmdline and any(argv0.endswith(n.encode()) for n in (*BINARIES, *NODE_BINARIES)):
            found.append(int(entry.name))
    return found


def terminate(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop(name: str) -> None:
    pid = running_pid(name)
    if pid is not None:
        terminate([pid])
    pid_file(name).unlink(missing_ok=True)
