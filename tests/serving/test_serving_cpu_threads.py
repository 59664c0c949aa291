"""`spec.serving.cpuThreads` (PHI3_CPU_THREADS) reaches onnxruntime: the threads a CPU model's loading
starts grow one for one with it, in a fresh process each, and the runtime's log line says what it chose."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from phi3_serving.batching import BatchOptions, OnnxBatchEngine
from phi3_serving.cpus import ENV_CPU_THREADS
from phi3_serving.variants import OnnxVariant
from tests.support.serving import REPO_ROOT
from tests.support.tiny_model import TinyModel

# Loads the model in a process of its own and prints how many OS threads the load started.
COUNT_THREADS = """
import json, os, sys
from pathlib import Path
from phi3_serving.onnx_model import OnnxGenAIEngine
from phi3_serving.variants import OnnxVariant
before = len(os.listdir("/proc/self/task"))
engine = OnnxGenAIEngine(OnnxVariant("cpu-int4", Path(sys.argv[1])))
print(json.dumps({"started": len(os.listdir("/proc/self/task")) - before, "options": engine.session_options}))
"""


def threads_started(variant_dir: str, threads: int) -> dict[str, object]:
    env = {**os.environ, ENV_CPU_THREADS: str(threads), "PYTHONPATH": str(REPO_ROOT / "operator")}
    result = subprocess.run([sys.executable, "-c", COUNT_THREADS, variant_dir], env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    answer: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def test_the_thread_setting_reaches_onnxruntime(tiny_model: TinyModel) -> None:
    variant_dir = str(tiny_model.variant_dir("cpu-int4"))
    one, three = threads_started(variant_dir, 1), threads_started(variant_dir, 3)
    assert one["options"] == {"intra_op_num_threads": 1}
    assert int(str(three["started"])) - int(str(one["started"])) == 2, (one, three)


def test_the_log_line_says_how_many_threads(tiny_model: TinyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = "2"
    monkeypatch.setenv(ENV_CPU_THREADS, threads)
    variant = OnnxVariant("cpu-int4", tiny_model.variant_dir("cpu-int4"))
    model = OnnxBatchEngine(variant, options=BatchOptions(solo_path="engine"))
    try:
        assert f"; {threads} onnxruntime threads)" in model.describe()
    finally:
        model.close()
