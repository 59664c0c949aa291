"""What both ONNX engines share: the model and its tokenizer, prompt rendering, validation and the
per-request og.Generator path.

`onnx_model.OnnxGenAIEngine` (one og.Generator per request) and `batching.OnnxBatchEngine`
(og.Engine) both build on `OnnxEngineBase`; this module imports neither of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from phi3_serving.chat import (
    ChatRequest,
    Completion,
    GenerationDefaults,
    Guidance,
    InvalidRequestError,
    StopSequenceFilter,
)
from phi3_serving.cpus import cgroup_cpu_limit, cpu_session_options, this_process_affinity
from phi3_serving.engine import PreparedChatEngine, StreamEvent
from phi3_serving.metrics import ModelMetrics, RequestMeter
from phi3_serving.variants import OnnxVariant, context_length, execution_target, read_genai_config

# Phi-3's format, for a tokenizer that ships no chat template of its own.
_FALLBACK_TEMPLATE_ROLE = "<|{role}|>\n{content}<|end|>\n"
_FALLBACK_GENERATION_PROMPT = "<|assistant|>\n"
# Grammars known to compile; a service sees few distinct schemas, so a small set suffices.
_GRAMMARS_REMEMBERED = 256


def cuda_available() -> bool:
    """True when the installed onnxruntime-genai is the CUDA build and can use a GPU."""
    import onnxruntime_genai as og

    try:
        return bool(og.is_cuda_available())
    except Exception:
        return False


_INT32_MAX = 2**31 - 1


def og_seed(seed: int) -> int:
    """onnxruntime-genai takes a 32-bit seed; a larger one (OpenAI's are 64-bit) is folded into that
    range, so that the same seed still gives the same answer. Seeds in range pass unchanged."""
    return seed if -(2**31) <= seed <= _INT32_MAX else seed % 2**31


def runtime_session_options(genai_config: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The decoder session options the runtime adds to the model's (CPU models only; see `cpus`)."""
    if execution_target(dict(genai_config)) != "cpu":
        return {}
    model_options = genai_config.get("model", {}).get("decoder", {}).get("session_options", {})
    return cpu_session_options(model_options, env, cgroup_cpu_limit(), this_process_affinity())


@dataclass(frozen=True)
class PreparedOnnxRequest:
    input_ids: Any  # numpy int32 array
    max_length: int  # onnxruntime-genai counts the prompt in it
    max_new_tokens: int
    request: ChatRequest


class OnnxEngineBase(PreparedChatEngine[PreparedOnnxRequest]):
    """What both ONNX engines share: the model, its tokenizer, prompt rendering and validation."""

    # Threads that may run `stream` at once; the runtime sizes its pool from it.
    max_concurrency: int

    def __init__(
        self,
        variant: OnnxVariant,
        *,
        defaults: GenerationDefaults | None,
        engine_overlay: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        import onnxruntime_genai as og

        self._og = og
        self.variant = variant
        self.genai_config = read_genai_config(variant.path)
        self.context_length = context_length(self.genai_config)
        self.vocab_size = int(self.genai_config.get("model", {}).get("vocab_size") or _INT32_MAX)
        self.session_options = runtime_session_options(self.genai_config, os.environ if env is None else env)
        overlay: dict[str, Any] = {}
        if self.session_options:
            overlay["model"] = {"decoder": {"session_options": self.session_options}}
        if engine_overlay:
            overlay["engine"] = dict(engine_overlay)
        config = og.Config(str(variant.path))
        if overlay:
            config.overlay(json.dumps(overlay))
        self._model = og.Model(config)
        self._tokenizer = og.Tokenizer(self._model)
        self._eos_token_ids = frozenset(int(token) for token in self._tokenizer.eos_token_ids)
        self._defaults = defaults or GenerationDefaults()
        self._model_id = f"onnx-genai/{variant.name}"
        self.metrics: ModelMetrics | None = None
        self._good_grammars: set[tuple[str, str]] = set()

    def describe_threads(self) -> str:
        """The onnxruntime settings the runtime chose, for the engine's log line."""
        threads = self.session_options.get("intra_op_num_threads")
        return f"{threads} onnxruntime threads" if threads is not None else "the model's onnxruntime threads"

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

    def _check_guidance(self, guidance: Guidance) -> None:
        """Compile the grammar here, so a bad schema is a 400 before any generation starts.

        onnxruntime-genai compiles a grammar when a Generator is made from the params; a Generator
        two tokens long costs little. Grammars that compiled are remembered.
        """
        key = (guidance.kind, guidance.grammar)
        if key in self._good_grammars:
            return
        try:
            params = self._og.GeneratorParams(self._model)
            params.set_search_options(max_length=2)
            params.set_guidance(guidance.kind, guidance.grammar)
            self._og.Generator(self._model, params)
        except Exception as error:
            raise InvalidRequestError(
                f"'{guidance.param}' cannot be used to guide generation: {error}", param=guidance.param
            ) from None
        if len(self._good_grammars) >= _GRAMMARS_REMEMBERED:
            self._good_grammars.clear()
        self._good_grammars.add(key)

    def _prepare(self, request: ChatRequest) -> PreparedOnnxRequest:
        if request.options.guidance is not None:
            self._check_guidance(request.options.guidance)
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
        return PreparedOnnxRequest(
            input_ids=input_ids,
            max_length=max_length,
            max_new_tokens=max_length - prompt_tokens,
            request=request,
        )

    def generator_params(self, prepared: PreparedOnnxRequest) -> Any:
        """GeneratorParams for the per-request path: sampling, seed, length and guidance."""
        options = prepared.request.options
        params = self._og.GeneratorParams(self._model)
        search: dict[str, Any] = {"max_length": prepared.max_length}
        if options.greedy:
            search["do_sample"] = False
        else:
            search.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
            if options.top_k is not None:
                search["top_k"] = self.og_top_k(options.top_k)
        if options.seed is not None:
            search["random_seed"] = og_seed(options.seed)
        if options.min_tokens:
            search["min_length"] = min(prepared.max_length, len(prepared.input_ids) + options.min_tokens)
        params.set_search_options(**search)
        if options.guidance is not None:
            params.set_guidance(options.guidance.kind, options.guidance.grammar)
        return params

    def og_top_k(self, top_k: int) -> int:
        """onnxruntime-genai refuses a top_k past the vocabulary, which means the whole vocabulary."""
        return min(top_k, self.vocab_size)

    def generate_alone(
        self,
        prepared: PreparedOnnxRequest,
        cancelled: Callable[[], bool] | None = None,
        meter: RequestMeter | None = None,
    ) -> Iterator[StreamEvent]:
        """One request on its own og.Generator, in the calling thread: the per-request path."""
        stop_filter = StopSequenceFilter(prepared.request.options.stop)
        meter = meter or RequestMeter(self.metrics, len(prepared.input_ids))
        finish_reason = "cancelled"
        generator = self._og.Generator(self._model, self.generator_params(prepared))
        try:
            generator.append_tokens(prepared.input_ids)
            decode = self._tokenizer.create_stream().decode
            generated = 0
            token = -1
            # The hot loop: keep it as lean as the bare onnxruntime-genai loop it is measured against.
            while not generator.is_done():
                if cancelled is not None and cancelled():
                    token = -2  # neither end-of-sequence nor a length cut
                    break
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                generated += 1
                meter.token()
                piece = decode(token)
                piece = stop_filter.feed(piece)
                if piece:
                    yield StreamEvent(piece)
                if stop_filter.stopped:
                    break
            stopped = token in self._eos_token_ids or stop_filter.stopped
            finish_reason = "cancelled" if token == -2 else "stop" if stopped else "length"
        finally:
            del generator
            # Counted as finished here: closing this stream is what stops the compute.
            meter.finish(finish_reason)
        if not stop_filter.stopped:
            tail = stop_filter.flush()
            if tail:
                yield StreamEvent(tail)
        yield StreamEvent(
            "",
            Completion(
                text="",
                finish_reason=finish_reason,
                prompt_tokens=len(prepared.input_ids),
                completion_tokens=generated,
            ),
        )
