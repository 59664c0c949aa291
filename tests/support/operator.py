"""A real operator process (`phi3-operator run`) against the local control plane."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.cluster import REPO_ROOT, Cluster

CRD_FILE = REPO_ROOT / "crds" / "phi3.ai_phi3models.yaml"
# Operators this test process started, so that a test that installs the operator in-cluster (the demo)
# can stop them first: two operators on one model fight over its Deployment.
RUNNING: list[OperatorProcess] = []


def install_crd(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", "crd/phi3models.phi3.ai", "--timeout=60s")


@dataclass
class OperatorProcess:
    cluster: Cluster
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**self.cluster.env, "PYTHONUNBUFFERED": "1", **self.extra_env}
        executable = Path(sys.executable).with_name("phi3-operator")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(executable), "run", *self.args], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        RUNNING.append(self)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self in RUNNING:
            RUNNING.remove(self)
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def operator_env(resync_s: float = 3.0, refresh_s: float = 3.0) -> dict[str, str]:
    return {
        "PHI3_RESYNC_INTERVAL": str(resync_s),
        "PHI3_MODEL_REFRESH_INTERVAL": str(refresh_s),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # As the chart and the operator image set it: fewer malloc arenas for a threaded Python.
        "MALLOC_ARENA_MAX": "2",
        "PATH": os.environ["PATH"],
    }


def stop_host_operators() -> None:
    for process in list(RUNNING):
        process.stop()


def is_operator_agent(user_agent: str) -> bool:
    """An API request by the operator: its own client names itself phi3-operator/VERSION (k8s.new_api_client),
    kopf's watches and patches say kopf."""
    return user_agent.startswith("phi3-operator/") or "kopf" in user_agent


@contextlib.contextmanager
def operator_with_config(replacing: OperatorProcess, config: Mapping[str, Any], workdir: Path
                         ) -> Iterator[OperatorProcess]:
    """An operator reading `config` (what the chart's ConfigMap holds) in place of `replacing`, the
    session's, which is stopped meanwhile and started again after: two operators on one model fight
    over its Deployment."""
    from tests.support.mlflow_server import free_port

    config_path = workdir / "operator-config.yaml"
    config_path.write_text(yaml.safe_dump(dict(config)))
    with contextlib.ExitStack() as stack:
        replacing.stop()
        stack.callback(replacing.start)
        process = OperatorProcess(
            cluster=replacing.cluster, log_path=workdir / "operator.log",
            args=("--metrics-address", f"127.0.0.1:{free_port()}"),
            extra_env={**operator_env(resync_s=3.0, refresh_s=3.0), "PHI3_OPERATOR_CONFIG": str(config_path)},
        )
        process.start()
        stack.callback(process.stop)
        yield process
