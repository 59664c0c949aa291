"""The transformers flavor: a model logged by `mlflow.transformers.log_model(task="llm/v1/chat")`.

MLflow's own pyfunc for it answers `predict` with chat.completion dicts but cannot stream. The
runtime therefore drives the pipeline MLflow loaded (`PyFuncModel.get_raw_model()`) itself:
the chat template, `model.generate` and a `TextIteratorStreamer`, so tokens stream as they
are generated and both flavors honour the same request fields.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from phi3_serving.chat import (
    ChatRequest,
    Completion,
    GenerationDefaults,
    InvalidRequestError,
    StopSequenceFilter,
)
from phi3_serving.engine import PreparedChatEngine, StreamEvent
from phi3_serving.metrics import RequestMeter

FLAVOR = "transformers"

# How long the consumer waits for the next token before it declares generation stuck.
_TOKEN_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class _PreparedRequest:
    input_ids: Any  # torch.LongTensor, shape [1, n]
    max_new_tokens: int
    request: ChatRequest


class TransformersEngine(PreparedChatEngine[_PreparedRequest]):
    """A text-generation pipeline behind the ChatEngine interface; thread-safe and bounded."""

    def __init__(
        self,
        pipeline: Any,
        *,
        name: str = "model",
        defaults: GenerationDefaults | None = None,
        max_concurrency: int = 4,
    ) -> None:
        self._model = pipeline.model
        self._tokenizer = pipeline.tokenizer
        if self._tokenizer is None:
            raise ValueError("the transformers pipeline has no tokenizer")
        config = self._model.config
        self.context_length = int(getattr(config, "max_position_embeddings", None) or self._tokenizer.model_max_length)
        eos = self._model.generation_config.eos_token_id
        if eos is None:
            eos = self._tokenizer.eos_token_id
        self._eos_token_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self._pad_token_id = self._tokenizer.pad_token_id
        if self._pad_token_id is None:
            self._pad_token_id = next(iter(self._eos_token_ids), 0)
        self._defaults = defaults or GenerationDefaults()
        self.max_concurrency = max_concurrency
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._model_id = f"transformers/{name}"


    def render_prompt(self, request: ChatRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        if not getattr(self._tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template; send 'prompt' instead")
        return str(
            self._tokenizer.apply_chat_template(request.messages_as_dicts(), tokenize=False, add_generation_prompt=True)
        )

    def _prepare(self, request: ChatRequest) -> _PreparedRequest:
        guidance = request.options.guidance
        if guidance is not None:
            # transformers has no grammar-constrained decoding of its own; the ONNX flavor does.
            raise InvalidRequestError(
                f"'{guidance.param}' needs constrained decoding, which the transformers flavor does not offer; "
                f"serve the model's ONNX flavor (phi3-operator package onnx) for structured output",
                param=guidance.param,
            )
        encoded = self._tokenizer(self.render_prompt(request), return_tensors="pt", add_special_tokens=False)
        input_ids = encoded["input_ids"]
        prompt_tokens = int(input_ids.shape[-1])
        if prompt_tokens >= self.context_length:
            raise InvalidRequestError(
                f"the prompt is {prompt_tokens} tokens long; this model's context is {self.context_length} "
                f"tokens, which must also leave room for at least one generated token",
                param="messages" if request.messages is not None else "prompt",
                code="context_length_exceeded",
            )
        max_new_tokens = min(request.options.max_tokens, self.context_length - prompt_tokens)
        return _PreparedRequest(input_ids=input_ids, max_new_tokens=max_new_tokens, request=request)

    def _generate(self, prepared: _PreparedRequest) -> Iterator[StreamEvent]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        options = prepared.request.options
        tokens = _TokenQueue()
        halt = threading.Event()

        class _HaltWhenAsked(StoppingCriteria):
            """Ends generation once the consumer saw a stop sequence or went away."""

            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return halt.is_set()

        sampling: dict[str, Any] = {"do_sample": False}
        if not options.greedy:
            sampling = {"do_sample": True, "temperature": options.temperature, "top_p": options.top_p}
            sampling["top_k"] = options.top_k if options.top_k is not None else 0
        failure: list[BaseException] = []

        def run_generate() -> None:
            try:
                if options.seed is not None:
                    # torch's generator is per process: reproducible while seeded requests do not overlap.
                    torch.manual_seed(options.seed)
                with torch.inference_mode():
                    self._model.generate(
                        input_ids=prepared.input_ids,
                        attention_mask=torch.ones_like(prepared.input_ids),
                        max_new_tokens=prepared.max_new_tokens,
                        min_new_tokens=min(options.min_tokens, prepared.max_new_tokens),
                        pad_token_id=self._pad_token_id,
                        eos_token_id=sorted(self._eos_token_ids) or None,
                        streamer=tokens,
                        stopping_criteria=StoppingCriteriaList([_HaltWhenAsked()]),
                        **sampling,
                    )
            except BaseException as error:
                failure.append(error)
            finally:
                tokens.end()

        stop_filter = StopSequenceFilter(options.stop)
        decoder = _IncrementalDecoder(self._tokenizer)
        generated = 0
        last_token = -1
        meter = RequestMeter(self.metrics, int(prepared.input_ids.shape[-1]))
        finish_reason = "cancelled"
        with self._slots:
            worker = threading.Thread(target=run_generate, name="phi3-transformers-generate", daemon=True)
            worker.start()
            try:
                for token in tokens:
                    generated += 1
                    meter.token()
                    last_token = token
                    if token in self._eos_token_ids:
                        continue
                    piece = decoder.add(token)
                    piece = stop_filter.feed(piece)
                    if piece:
                        yield StreamEvent(piece)
                    if stop_filter.stopped:
                        break
                stopped = last_token in self._eos_token_ids or stop_filter.stopped
                finish_reason = "stop" if stopped else "length"
            finally:
                halt.set()
                # The queue is unbounded, so generate() never waits on us; it ends at its next step.
                worker.join()
                meter.finish("error" if failure else finish_reason)
        if failure:
            raise failure[0]
        if not stop_filter.stopped:
            held = stop_filter.feed(decoder.flush())
            if held:
                yield StreamEvent(held)
        if not stop_filter.stopped:
            tail = stop_filter.flush()
            if tail:
                yield StreamEvent(tail)
        yield StreamEvent(
            "",
            Completion(
                text="",
                finish_reason=finish_reason,
                prompt_tokens=int(prepared.input_ids.shape[-1]),
                completion_tokens=generated,
            ),
        )


class _TokenQueue:
    """A transformers streamer (duck-typed BaseStreamer) that hands generated token ids to an iterator."""

    _END = -1

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        # generate() first puts the prompt, then one tensor per step.
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._queue.put(int(token))

    def end(self) -> None:
        self._queue.put(self._END)

    def __iter__(self) -> Iterator[int]:
        while True:
            token = self._queue.get(timeout=_TOKEN_TIMEOUT_S)
            if token == self._END:
                return
            yield token


class _IncrementalDecoder:
    """Token-by-token text, without splitting multi-byte characters (the prefix/read offset method)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token: int) -> str:
        self._tokens.append(token)
        decode = self._tokenizer.decode
        prefix_text = decode(self._tokens[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        new_text = decode(self._tokens[self._prefix_offset :], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return str(new_text[len(prefix_text) :])
        return ""

    def flush(self) -> str:
        """Whatever is still held back when generation ends (an incomplete character stays as U+FFFD)."""
        decode = self._tokenizer.decode
        prefix_text = decode(self._tokens[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        new_text = decode(self._tokens[self._prefix_offset :], skip_special_tokens=True)
        self._prefix_offset = self._read_offset = len(self._tokens)
        return str(new_text[len(prefix_text) :])


def engine_from_pyfunc(
    pyfunc_model: Any, *, name: str, defaults: GenerationDefaults, max_concurrency: int
) -> TransformersEngine:
    pipeline = pyfunc_model.get_raw_model()
    return TransformersEngine(pipeline, name=name, defaults=defaults, max_concurrency=max_concurrency)
