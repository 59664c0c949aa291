"""SIGTERM ends the runtime at every stage, as the kubelet sends it to a container's PID 1.

In a container the runtime is PID 1 of its PID namespace, and the kernel gives PID 1 no default signal
actions: a SIGTERM it has no handler for is dropped. A pod scaled down (or rolled) while its model loads
then waited out its whole grace period. These run the runtime as PID 1 of a namespace of its own.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.serving.conftest import onnx_process
from tests.support.serving import ServedProcess
from tests.support.wait import wait_until


def answers(served: ServedProcess) -> bool:
    try:
        return served.get("/v2/health/ready")[0] == 200
    except OSError:
        return False


def test_sigterm_while_the_model_loads_ends_the_runtime_at_once(onnx_model_dir: Path, tmp_path: Path) -> None:
    served = onnx_process(onnx_model_dir, "loading", tmp_path, {})
    served.as_pid_1 = True
    served.start(wait_ready=False)
    try:
        # `settings in` is printed once `serve` runs, before MLServer has loaded the model.
        wait_until(lambda: "settings in" in served.log_tail(), timeout=120, interval=0.05,
                   message="serve to start loading")
        assert not answers(served), "the model was already served: this test needs the signal during the load"
        sent = time.monotonic()
        served.send_signal(signal.SIGTERM)
        code = served.wait(timeout=20)
        assert code == 128 + signal.SIGTERM, served.log_tail()
        assert time.monotonic() - sent < 10
    finally:
        served.stop()


def test_sigterm_once_serving_stops_gracefully(onnx_model_dir: Path, tmp_path: Path) -> None:
    served = onnx_process(onnx_model_dir, "serving", tmp_path, {})
    served.as_pid_1 = True
    served.start()
    try:
        status, _ = served.get("/v2/health/ready")
        assert status == 200
        served.send_signal(signal.SIGTERM)
        # MLServer's own handler has replaced the loading one: it stops its servers and returns 0.
        assert served.wait(timeout=60) == 0, served.log_tail()
    finally:
        served.stop()
