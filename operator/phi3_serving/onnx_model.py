"""The ONNX GenAI flavor: an onnxruntime-genai model folder served as an MLflow pyfunc.

`OnnxGenAIEngine` drives onnxruntime-genai 0.18 directly: one `og.Generator` per request,
`append_tokens`, `generate_next_token` and a tokenizer stream. `OnnxGenAIChatModel` is the
`mlflow.pyfunc.PythonModel` logged by `phi3-operator package onnx` (models-from-code, see
`onnx_model_entry.py`); it loads the variant the operator names in PHI3_ONNX_VARIANT.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.pyfunc.model import PythonModel

from phi3_serving.chat import (
    ChatRequest,
    Completion,
    GenerationDefaults,
    InvalidRequestError,
    StopSequenceFilter,
)
from phi3_serving.engine import (
    PreparedChatEngine,
    StreamEvent,
    max_concurrency_from_env,
    predict_stream_with,
    predict_with,
)
from phi3_serving.variants import (
    ENV_VARIANT,
    OnnxVariant,
    choose_variant,
    context_length,
    find_variants,
    read_genai_config,
)

# The artifact key under which the model folder is logged.
ARTIFACT_KEY = "onnx_model"
FLAVOR = "onnx-genai"

# Phi-3's format, for a tokenizer that ships no chat template of its own.
_FALLBACK_TEMPLATE_ROLE = "<|{role}|>\n{content}<|end|>\n"
_FALLBACK_GENERATION_PROMPT = "<|assistant|>\n"


def cuda_available() -> bool:
    """True when the installed onnxruntime-genai is the CUDA build and can use a GPU."""
    import onnxruntime_genai as og

    try:
        return bool(og.is_cuda_available())
    except Exception:
        return False


@dataclass(frozen=True)
class _PreparedRequest:
    input_ids: Any  # numpy int32 array
    max_length: int  # onnxruntime-genai counts the prompt in it
    max_new_tokens: int
    request: ChatRequest


class OnnxGenAIEngine(PreparedChatEngine[_PreparedRequest]):
    """One loaded onnxruntime-genai model; thread-safe, at most `max_concurrency` generations at once."""

    def __init__(
        self,
        variant: OnnxVariant,
        *,
        defaults: GenerationDefaults | None = None,
        max_concurrency: int = 4,
    ) -> None:
        import onnxruntime_genai as og

        self._og = og
        self.variant = variant
        config = read_genai_config(variant.path)
        self.context_length = context_length(config)
        self._model = og.Model(str(variant.path))
        self._tokenizer = og.Tokenizer(self._model)
        self._eos_token_ids = frozenset(int(token) for token in self._tokenizer.eos_token_ids)
        self._defaults = defaults or GenerationDefaults()
        self.max_concurrency = max_concurrency
        # One Generator per request shares the model; the bound keeps memory and latency sane.
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._model_id = f"onnx-genai/{variant.name}"

    @classmethod
    def from_folder(cls, root: Path, env: Mapping[str, str] | None = None) -> OnnxGenAIEngine:
        """Load the variant PHI3_ONNX_VARIANT names (or the one that fits this machine) from `root`."""
        env = os.environ if env is None else env
        variant = choose_variant(find_variants(root), env.get(ENV_VARIANT) or None, cuda_available())
        return cls(
            variant,
            defaults=GenerationDefaults.from_env(env),
            max_concurrency=max_concurrency_from_env(env),
        )

    # -- internals -----------------------------------------------------------------------------

    def render_prompt(self, request: ChatRequest) -> str:
        """The text the model sees: a raw prompt as is, chat messages through the chat template."""
        if request.prompt is not None:
            return request.prompt
        messages = request.messages_as_dicts()
        try:
            return str(self._tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True))
        except Exception:
            rendered = "".join(_FALLBACK_TEMPLATE_ROLE.format(**message) for message in messages)
            return rendered + _FALLBACK_GENERATION_PROMPT

    def _prepare(self, request: ChatRequest) -> _PreparedRequest:
        input_ids = self._tokenizer.encode(self.render_prompt(request))
        prompt_tokens = len(input_ids)
        if prompt_tokens >= self.context_length:
            raise InvalidRequestError(
                f"the prompt is {prompt_tokens} tokens long; this model's context is {self.context_length} "
                f"tokens, which must also leave room for at least one generated token",
                param="messages" if request.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        # A request may ask for more than fits; it then ends early with finish_reason "length".
        max_length = min(prompt_tokens + request.options.max_tokens, self.context_length)
        return _PreparedRequest(
            input_ids=input_ids,
            max_length=max_length,
            max_new_tokens=max_length - prompt_tokens,
            request=request,
        )

    def _generator_params(self, prepared: _PreparedRequest) -> Any:
        options = prepared.request.options
        params = self._og.GeneratorParams(self._model)
        search: dict[str, Any] = {"max_length": prepared.max_length}
        if options.greedy:
            search["do_sample"] = False
        else:
            search.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
            if options.top_k is not None:
                search["top_k"] = options.top_k
        params.set_search_options(**search)
        return params

    def _generate(self, prepared: _PreparedRequest) -> Iterator[StreamEvent]:
        stop_filter = StopSequenceFilter(prepared.request.options.stop) if prepared.request.options.stop else None
        with self._slots:
            generator = self._og.Generator(self._model, self._generator_params(prepared))
            try:
                generator.append_tokens(prepared.input_ids)
                decode = self._tokenizer.create_stream().decode
                generated = 0
                token = -1
                # The hot loop: keep it as lean as the bare onnxruntime-genai loop it is measured against.
                while not generator.is_done():
                    generator.generate_next_token()
                    token = int(generator.get_next_tokens()[0])
                    generated += 1
                    piece = decode(token)
                    if stop_filter is not None:
                        piece = stop_filter.feed(piece)
                        if stop_filter.stopped:
                            if piece:
                                yield StreamEvent(piece)
                            break
                    if piece:
                        yield StreamEvent(piece)
            finally:
                del generator
        if stop_filter is not None and not stop_filter.stopped:
            tail = stop_filter.flush()
            if tail:
                yield StreamEvent(tail)
        stopped = token in self._eos_token_ids or (stop_filter is not None and stop_filter.stopped)
        yield StreamEvent(
            "",
            Completion(
                text="",
                finish_reason="stop" if stopped else "length",
                prompt_tokens=len(prepared.input_ids),
                completion_tokens=generated,
            ),
        )


class OnnxGenAIChatModel(PythonModel):
    """The pyfunc that `phi3-operator package onnx` logs.

    Input: `{"messages": [...]}` or `{"prompt": "..."}` plus optional max_tokens, temperature,
    top_p, top_k and stop (or a list of such dicts, or a DataFrame of them). Output: a list of
    chat.completion dicts with usage, as MLflow's transformers llm/v1/chat flavor returns.
    """

    def __init__(self) -> None:
        self._engine: OnnxGenAIEngine | None = None

    def load_context(self, context: Any) -> None:
        self._engine = OnnxGenAIEngine.from_folder(Path(context.artifacts[ARTIFACT_KEY]))

    @property
    def engine(self) -> OnnxGenAIEngine:
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
