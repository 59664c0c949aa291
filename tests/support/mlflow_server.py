"""A real `mlflow server` for tests: sqlite backend, local artifacts, loopback only.

    with MlflowServer(tmp_path) as mlflow_server:
        client = MlflowClient(mlflow_server.tracking_uri)
        mlflow_server.stop()      # simulate an outage ...
        mlflow_server.start()     # ... and recover on the same port and data

The server proxies artifacts (`--serve-artifacts`), so clients need no access to its disk, the
way an in-cluster MLflow is used.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import TracebackType

from tests.support.processes import log_tail, stop_process_group
from tests.support.wait import wait_until


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _mlflow_executable() -> list[str]:
    candidate = Path(sys.executable).with_name("mlflow")
    return [str(candidate)] if candidate.exists() else [sys.executable, "-m", "mlflow"]


class MlflowServer:
    """One `mlflow server` process whose data lives in `workdir` and survives restarts."""

    def __init__(self, workdir: Path, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path = self.workdir / "mlflow-server.log"

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self._log_path, lines)

    def start(self, timeout: float = 120.0) -> MlflowServer:
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        artifacts = self.workdir / "artifacts"
        artifacts.mkdir(exist_ok=True)
        command = [
            *_mlflow_executable(),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination",
            str(artifacts),
            "--serve-artifacts",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # No background job runner (MLflow's huey workers): a test server needs none, and it
        # starts and stops faster without them.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with self._log_path.open("ab") as log:
            # A session of its own, so stop() can end the server and the workers it forks.
            self._process = subprocess.Popen(
                command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            wait_until(self._healthy, timeout=timeout, interval=0.25, message=f"mlflow server on {self.tracking_uri}")
        except Exception:
            tail = self.log_tail()
            self.stop()
            raise RuntimeError(f"mlflow server did not become healthy:\n{tail}") from None
        return self

    def _healthy(self) -> bool:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {self._process and self._process.returncode}")
        with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=2) as response:
            return bool(response.status == 200)

    def stop(self, timeout: float = 30.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        stop_process_group(process, timeout)
        # Until the port is free again a restart on it would fail.
        wait_until(self._port_free, timeout=timeout, interval=0.2, message=f"port {self.port} to be released")

    def _port_free(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            return sock.connect_ex((self.host, self.port)) != 0

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
