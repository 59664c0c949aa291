"""The ONNX GenAI flavor: an onnxruntime-genai model folder served as an MLflow pyfunc.

Two engines share the loading, templating and validation in `onnx_engine.OnnxEngineBase`:
- `OnnxGenAIEngine` drives onnxruntime-genai 0.18 directly: one `og.Generator` per request,
  `append_tokens`, `generate_next_token` and a tokenizer stream (PHI3_ONNX_ENGINE=generator);
- `batching.OnnxBatchEngine` batches requests on `og.Engine` (the default).

`OnnxGenAIChatModel` is the `mlflow.pyfunc.PythonModel` logged by `phi3-operator package onnx`
(models-from-code, see `onnx_model_entry.py`); it loads the variant the operator names in
PHI3_ONNX_VARIANT with the engine PHI3_ONNX_ENGINE names.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.pyfunc.model import PythonModel

from phi3_serving.batching import OnnxBatchEngine, batch_options_from_env
from phi3_serving.chat import GenerationDefaults
from phi3_serving.engine import StreamEvent, max_concurrency_from_env, predict_stream_with, predict_with
from phi3_serving.onnx_engine import OnnxEngineBase, PreparedOnnxRequest, cuda_available
from phi3_serving.variants import ENV_VARIANT, OnnxVariant, choose_variant, find_variants

# The artifact key under which the model folder is logged.
ARTIFACT_KEY = "onnx_model"
FLAVOR = "onnx-genai"

# Which engine serves the model: "batch" (og.Engine, with a measured per-request path for a lone
# request), or "generator" (one og.Generator per request, the engine before batching).
ENV_ENGINE = "PHI3_ONNX_ENGINE"
ENGINES = ("batch", "generator")


class OnnxGenAIEngine(OnnxEngineBase):
    """One og.Generator per request; thread-safe, at most `max_concurrency` generations at once."""

    def __init__(
        self,
        variant: OnnxVariant,
        *,
        defaults: GenerationDefaults | None = None,
        max_concurrency: int = 4,
    ) -> None:
        super().__init__(variant, defaults=defaults)
        self.max_concurrency = max_concurrency
        # One Generator per request shares the model; the bound keeps memory and latency sane.
        self._slots = threading.BoundedSemaphore(max_concurrency)

    @classmethod
    def from_folder(cls, root: Path, env: Mapping[str, str] | None = None) -> OnnxEngineBase:
        """Load the variant PHI3_ONNX_VARIANT names (or the one that fits this machine) from `root`,
        with the engine PHI3_ONNX_ENGINE names."""
        env = os.environ if env is None else env
        variant = choose_variant(find_variants(root), env.get(ENV_VARIANT) or None, cuda_available())
        defaults = GenerationDefaults.from_env(env)
        kind = env.get(ENV_ENGINE) or "batch"
        if kind not in ENGINES:
            raise ValueError(f"{ENV_ENGINE} must be one of {', '.join(ENGINES)}, got {kind!r}")
        if kind == "generator":
            return cls(variant, defaults=defaults, max_concurrency=max_concurrency_from_env(env))
        return OnnxBatchEngine(variant, defaults=defaults, options=batch_options_from_env(env))

    def describe(self) -> str:
        """One log line: how requests run."""
        return f"one og.Generator per request, at most {self.max_concurrency} at once; {self.describe_threads()}"

    # -- internals -----------------------------------------------------------------------------

    def _generate(self, prepared: PreparedOnnxRequest) -> Iterator[StreamEvent]:
        with self._slots:
            yield from self.generate_alone(prepared)


class OnnxGenAIChatModel(PythonModel):
    """The pyfunc that `phi3-operator package onnx` logs.

    Input: `{"messages": [...]}` or `{"prompt": "..."}` plus optional max_tokens, temperature,
    top_p, top_k and stop (or a list of such dicts, or a DataFrame of them). Output: a list of
    chat.completion dicts with usage, as MLflow's transformers llm/v1/chat flavor returns.
    """

    def __init__(self) -> None:
        self._engine: OnnxEngineBase | None = None

    def load_context(self, context: Any) -> None:
        self._engine = OnnxGenAIEngine.from_folder(Path(context.artifacts[ARTIFACT_KEY]))

    @property
    def engine(self) -> OnnxEngineBase:
        if self._engine is None:
            raise RuntimeError("the model is not loaded yet (load_context has not run)")
        return self._engine

    # `model_input` stays unannotated on purpose: MLflow turns a type hint there into schema
    # enforcement that would reshape chat requests.
    def predict(  # type: ignore[no-untyped-def]
        self, context: Any, model_input, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        return predict_with(self.engine, model_input, params)

    def predict_stream(  # type: ignore[no-untyped-def]
        self, context: Any, model_input, params: dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        return predict_stream_with(self.engine, model_input, params)
