"""Load an MLflow model and give back what serves it: our engine, or the user's own pyfunc.

Models made by `phi3-operator package` (and transformers chat pipelines) get our engines, with
batching, guidance and tools. Any other pyfunc is served as MLflow serves it, and gets the
OpenAI endpoint its metadata calls for (`pyfunc_model.model_shape`).

The runtime, the benchmark and the tests all go through `load_served_model`, so they load a
model exactly the way the container does: `mlflow.pyfunc.load_model` on the (downloaded) URI.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from phi3_serving.chat import GenerationDefaults
from phi3_serving.engine import ChatEngine, max_concurrency_from_env
from phi3_serving.metrics import ModelMetrics
from phi3_serving.pyfunc_model import ModelShape, PyfuncChatEngine, model_shape

PYFUNC_FLAVOR = "pyfunc"


@dataclass(frozen=True)
class ServedModel:
    pyfunc: Any  # mlflow.pyfunc.PyFuncModel
    engine: ChatEngine | None  # None: only /invocations and V2 (or /v1/responses) through the pyfunc
    flavor: str  # "onnx-genai", "transformers" or "pyfunc"
    max_concurrency: int
    shape: ModelShape | None = None  # a user's pyfunc; None for our own engines
    context_tokens: int | None = None  # the model's context, where the engine knows it
    batch_size: int | None = None  # requests computed at once, where fewer than max_concurrency

    @property
    def running_capacity(self) -> int:
        """How many requests the model computes at once; those beyond it wait."""
        return self.batch_size or self.max_concurrency

    @property
    def ours(self) -> bool:
        """Served by one of our engines (batching, guidance, tools), not by the model's own predict."""
        return self.shape is None


def load_served_model(model_uri: str, *, name: str = "model", env: Mapping[str, str] | None = None) -> ServedModel:
    env = os.environ if env is None else env
    # A serving process never reaches a model hub; transformers would otherwise try.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import mlflow.pyfunc

    with warnings.catch_warnings():
        # MLflow nags about missing predict type hints; ours are left out on purpose (onnx_model.py).
        warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)
        # suppress_warnings: MLflow would otherwise compare the model's requirements with every installed
        # distribution (about 2 s of every start, stat'ing some 20,000 files) only to log a warning. The
        # operator matched the requirements to this image when it chose the image.
        pyfunc_model = mlflow.pyfunc.load_model(model_uri, suppress_warnings=True)
    flavors = pyfunc_model.metadata.flavors
    if "transformers" in flavors:
        from phi3_serving.transformers_model import FLAVOR as TRANSFORMERS_FLAVOR
        from phi3_serving.transformers_model import engine_from_pyfunc

        max_concurrency = max_concurrency_from_env(env)
        transformers_engine = engine_from_pyfunc(
            pyfunc_model, name=name, defaults=GenerationDefaults.from_env(env), max_concurrency=max_concurrency
        )
        transformers_engine.attach_metrics(ModelMetrics(name))
        return ServedModel(
            pyfunc_model, transformers_engine, TRANSFORMERS_FLAVOR, max_concurrency,
            context_tokens=transformers_engine.context_length,
        )

    from phi3_serving.onnx_model import FLAVOR as ONNX_FLAVOR
    from phi3_serving.onnx_model import OnnxGenAIChatModel

    try:
        python_model = pyfunc_model.unwrap_python_model()
    except Exception:  # not a PythonModel (e.g. a sklearn model): served as a plain pyfunc
        python_model = None
    if isinstance(python_model, OnnxGenAIChatModel):
        onnx_engine = python_model.engine
        onnx_engine.attach_metrics(ModelMetrics(name))
        from phi3_serving.batching import OnnxBatchEngine

        # The batching engine keeps hundreds of streams open, but decodes only a batch of them.
        batch_size = onnx_engine.max_batch_size if isinstance(onnx_engine, OnnxBatchEngine) else None
        return ServedModel(
            pyfunc_model, onnx_engine, ONNX_FLAVOR, onnx_engine.max_concurrency,
            context_tokens=onnx_engine.context_length, batch_size=batch_size or None,
        )
    shape = model_shape(pyfunc_model.metadata, python_model)
    metrics = ModelMetrics(name)
    engine: ChatEngine | None = None
    if shape.shape in ("chat", "prompt"):
        engine = PyfuncChatEngine(
            pyfunc_model, shape, name=name, defaults=GenerationDefaults.from_env(env), metrics=metrics
        )
    return ServedModel(pyfunc_model, engine, PYFUNC_FLAVOR, max_concurrency_from_env(env), shape)
