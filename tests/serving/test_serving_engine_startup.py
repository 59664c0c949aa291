"""The batch engine on a real onnxruntime-genai model: it is ready once the model has answered, and the
lone-request measurement runs afterwards, while the engine is idle, without holding requests up."""

from __future__ import annotations

import time

import pytest

from phi3_serving.batching import BatchOptions, OnnxBatchEngine
from phi3_serving.chat import GenerationDefaults, parse_chat_request
from phi3_serving.variants import OnnxVariant
from tests.support.tiny_model import TinyModel


def engine(tiny_model: TinyModel, solo_path: str) -> OnnxBatchEngine:
    variant = OnnxVariant("cpu-int4", tiny_model.variant_dir("cpu-int4"))
    return OnnxBatchEngine(variant, options=BatchOptions(solo_path=solo_path))


def answer(model: OnnxBatchEngine) -> str:
    request = parse_chat_request({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
                                 GenerationDefaults())
    return "".join(event.text for event in model.stream(request))


def test_auto_measures_the_lone_request_paths_after_load_while_idle(tiny_model: TinyModel) -> None:
    model = engine(tiny_model, "auto")
    try:
        assert model.solo_speedup is None or model.solo_speedup > 0
        if model.solo_speedup is None:
            assert "being measured while idle" in model.describe()
            assert not model.solo_enabled, "until measured, lone requests use the engine"
        answer(model)  # served during the measurement, on the engine
        deadline = time.monotonic() + 120
        while model.solo_speedup is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model.solo_speedup is not None, "the measurement never finished"
        assert model.solo_enabled == (model.solo_speedup >= 1.05)
        assert f"measured Generator/engine {model.solo_speedup:.2f}x" in model.describe()
        answer(model)
    finally:
        model.close()


@pytest.mark.parametrize("solo_path", ["engine", "generator"])
def test_a_forced_path_is_never_measured(tiny_model: TinyModel, solo_path: str) -> None:
    model = engine(tiny_model, solo_path)
    try:
        answer(model)
        time.sleep(0.5)
        assert model.solo_speedup is None
        assert model.solo_enabled == (solo_path == "generator")
        assert "forced" in model.describe()
    finally:
        model.close()
