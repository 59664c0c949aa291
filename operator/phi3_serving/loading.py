"""Load any model `phi3-operator package` produces and give back its chat engine.

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


class UnsupportedModel(ValueError):
    """An MLflow model that is neither of the two flavors we serve."""


@dataclass(frozen=True)
class ServedModel:
    pyfunc: Any  # mlflow.pyfunc.PyFuncModel
    engine: ChatEngine
    flavor: str  # "onnx-genai" or "transformers"
    max_concurrency: int


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
        return ServedModel(pyfunc_model, transformers_engine, TRANSFORMERS_FLAVOR, max_concurrency)

    from phi3_serving.onnx_model import FLAVOR as ONNX_FLAVOR
    from phi3_serving.onnx_model import OnnxGenAIChatModel

    try:
        python_model = pyfunc_model.unwrap_python_model()
    except Exception as error:
        raise UnsupportedModel(_unsupported(model_uri, flavors)) from error
    if not isinstance(python_model, OnnxGenAIChatModel):
        raise UnsupportedModel(_unsupported(model_uri, flavors))
    onnx_engine = python_model.engine
    onnx_engine.attach_metrics(ModelMetrics(name))
    return ServedModel(pyfunc_model, onnx_engine, ONNX_FLAVOR, onnx_engine.max_concurrency)


def _unsupported(model_uri: str, flavors: Mapping[str, Any]) -> str:
    return (
        f"{model_uri} is not a model phi3-operator can serve (flavors: {', '.join(flavors)}); package it with "
        f"`phi3-operator package onnx` or `phi3-operator package transformers`"
    )
