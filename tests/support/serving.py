"""Run the data-plane CLI the way users and the container do: as real processes on loopback."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.mlflow_server import free_port
from tests.support.processes import log_tail, stop_process_group
from tests.support.wait import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


@functools.cache
def phi3_command() -> tuple[str, ...]:
    """`phi3-operator` once the control plane forwards the data-plane commands, else our module."""
    console_script = Path(sys.executable).with_name("phi3-operator")
    if console_script.exists():
        probe = subprocess.run(
            [str(console_script), "fetch", "--help"], capture_output=True, text=True, timeout=120, check=False
        )
        if probe.returncode == 0 and "--dest" in probe.stdout:
            return (str(console_script),)
    return (sys.executable, "-m", "phi3_serving.cli")


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENV, **(extra or {})}


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*phi3_command(), *args],
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO_ROOT,
    )


def package(flavor: str, model_dir: Path, *, name: str, tracking_uri: str, alias: str | None = None,
            requirements: Sequence[str] = ()) -> str:
    """`phi3-operator package FLAVOR DIR`; returns the `models:/N/V` URI from the last stdout line."""
    args = ["package", flavor, str(model_dir), "--name", name, "--tracking-uri", tracking_uri]
    if alias:
        args += ["--alias", alias]
    for requirement in requirements:
        args += ["--requirement", requirement]
    result = run_cli(*args)
    if result.returncode != 0:
        raise AssertionError(f"package {flavor} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout.strip().splitlines()[-1]


def distinct_free_ports(count: int) -> list[int]:
    """Free ports, all different: the OS may hand the same free port to two calls in a row."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class ServedProcess:
    """`phi3-operator serve` on 127.0.0.1 with free ports; stopped (with its whole session) on exit."""

    model_uri: str
    model_name: str
    log_path: Path
    env: Mapping[str, str] | None = None
    # As in a container: the runtime is PID 1 of its own PID namespace, where a signal it has no handler
    # for is dropped (the kernel gives PID 1 no default actions), so a missing handler shows.
    as_pid_1: bool = False

    def __post_init__(self) -> None:
        self.http_port, self.grpc_port, self.metrics_port = distinct_free_ports(3)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 180, wait_ready: bool = True) -> ServedProcess:
        command = [
            *(("unshare", "--pid", "--fork", "--kill-child") if self.as_pid_1 else ()),
            *phi3_command(),
            "serve",
            "--model-uri",
            self.model_uri,
            "--model-name",
            self.model_name,
            "--host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            str(self.metrics_port),
        ]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                env=cli_env(self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        if not wait_ready:
            return self
        try:
            wait_until(self._ready, timeout=timeout, interval=0.25, message=f"{self.model_name} to be ready")
        except Exception:
            self.stop()
            raise AssertionError(f"serve did not become ready:\n{self.log_tail()}") from None
        return self

    def _ready(self) -> bool:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError(f"serve exited with {self._process and self._process.returncode}")
        status, _ = self.get("/v2/health/ready")
        return status == 200

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout: float = 30) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process_group(process, timeout)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        """The serving process itself: the CLI runs MLServer in-process, with no workers (as PID 1: the
        child `unshare` forked into the new namespace)."""
        if self._process is None:
            raise RuntimeError(f"{self.model_name} is not running")
        if not self.as_pid_1:
            return self._process.pid
        children = Path(f"/proc/{self._process.pid}/task/{self._process.pid}/children")
        found: list[int] = []
        wait_until(lambda: found.extend(int(p) for p in children.read_text().split()) or found, timeout=30,
                   interval=0.05, message="unshare's child")
        return found[0]

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float) -> int:
        """The exit status, as a container runtime reports it (128 + N for death by signal N)."""
        if self._process is None:
            raise RuntimeError(f"{self.model_name} is not running")
        code = self._process.wait(timeout=timeout)
        return 128 - code if code < 0 else code

    def get(self, path: str, port: int | None = None) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{port or self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as error:
            return int(error.code), bytes(error.read())

    def post(self, path: str, body: Any, *, raw: bytes | None = None, timeout: float = 120) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}{path}", data=data, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as error:
            payload = error.read()
            try:
                return int(error.code), json.loads(payload)
            except json.JSONDecodeError:
                return int(error.code), payload.decode(errors="replace")

    def __enter__(self) -> ServedProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


class MlflowModelsServe:
    """`mlflow models serve --env-manager local`: MLflow's own scoring server, the reference."""

    def __init__(self, model_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, **OFFLINE_ENV, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
        with log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local",
                 "-h", "127.0.0.1", "-p", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True,
            )
        self._log = log_path
        try:
            wait_until(self._ready, timeout=120, interval=0.25, message="mlflow models serve")
        except Exception:
            self.stop()
            raise AssertionError(f"mlflow models serve did not start:\n{log_tail(log_path)}") from None

    def _ready(self) -> bool:
        if self._process.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited:\n{log_tail(self._log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def invocations(self, body: Any) -> tuple[int, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/invocations", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as error:
            return int(error.code), json.loads(error.read())

    def stop(self) -> None:
        stop_process_group(self._process, 30)
