"""What every model flavor offers the runtime: a synchronous, thread-safe chat engine.

The MLServer runtime, the pyfunc wrappers and the benchmark all talk to a model through this
small interface, so the HTTP layer never cares whether ONNX GenAI or transformers sits below.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from phi3_serving.chat import (
    ChatRequest,
    Completion,
    GenerationDefaults,
    InvalidRequestError,
    chat_completion,
    chat_completion_chunk,
    new_completion_id,
    parse_chat_request,
    parse_tool_call,
    usage_dict,
)
from phi3_serving.metrics import ModelMetrics

ENV_MAX_CONCURRENCY = "PHI3_MAX_CONCURRENCY"
DEFAULT_MAX_CONCURRENCY = 4


@dataclass(frozen=True)
class StreamEvent:
    """One step of a streamed generation: new text, or (last) the finished completion."""

    text: str
    completion: Completion | None = None


class ChatEngine(Protocol):
    """A loaded model that answers validated chat requests. Implementations are thread-safe."""

    @property
    def model_id(self) -> str:
        """A short name of what is loaded, e.g. `onnx-genai/cpu-int4`."""
        ...

    @property
    def defaults(self) -> GenerationDefaults: ...

    def complete(self, request: ChatRequest) -> Completion:
        """Generate the whole answer."""
        ...

    def stream(self, request: ChatRequest) -> Iterator[StreamEvent]:
        """Validate the request now (raising InvalidRequestError), then stream the answer lazily."""
        ...


PreparedT = TypeVar("PreparedT")


class CancellableStream(Iterator[StreamEvent]):
    """A stream that another thread may cancel while its reader is blocked waiting for a token.

    Closing a Python generator only works from the thread that runs it; a request still waiting
    for a batch slot would otherwise be started (and computed) before its reader noticed that
    the client had gone. `cancel` is thread-safe and ends the stream at once.
    """

    def __init__(self, events: Generator[StreamEvent, None, None], cancel: Callable[[], None]) -> None:
        self._events = events
        self.cancel = cancel

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        self._events.close()


class PreparedChatEngine(ABC, Generic[PreparedT]):
    """A ChatEngine that checks and tokenizes a request first (raising at once), then generates lazily."""

    _model_id: str
    _defaults: GenerationDefaults
    metrics: ModelMetrics | None = None

    def attach_metrics(self, metrics: ModelMetrics) -> None:
        """Report to these metrics from now on (the runtime does; a plain pyfunc does not)."""
        self.metrics = metrics

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def defaults(self) -> GenerationDefaults:
        return self._defaults

    def complete(self, request: ChatRequest) -> Completion:
        return with_tool_calls(collect(self.stream(request)), request)

    def stream(self, request: ChatRequest) -> Iterator[StreamEvent]:
        return self._generate(self._prepare(request))

    @abstractmethod
    def _prepare(self, request: ChatRequest) -> PreparedT: ...

    @abstractmethod
    def _generate(self, prepared: PreparedT) -> Iterator[StreamEvent]: ...


def collect(events: Iterable[StreamEvent]) -> Completion:
    """The whole answer from a stream whose last event carries the completion's counts."""
    pieces: list[str] = []
    completion: Completion | None = None
    for event in events:
        pieces.append(event.text)
        completion = event.completion or completion
    if completion is None:
        raise RuntimeError("the generation stream ended without its completion event")
    return Completion(
        text="".join(pieces),
        finish_reason=completion.finish_reason,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
    )


def with_tool_calls(completion: Completion, request: ChatRequest) -> Completion:
    """An answer that is a call of one of the request's tools, as OpenAI returns it: `tool_calls`."""
    if not request.tools:
        return completion
    call = parse_tool_call(completion.text.strip(), request.tools)
    if call is None:
        return completion
    return Completion(
        text="",
        finish_reason="tool_calls",
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        tool_calls=(call,),
    )


def max_concurrency_from_env(env: Mapping[str, str]) -> int:
    raw = env.get(ENV_MAX_CONCURRENCY, "")
    if not raw:
        return DEFAULT_MAX_CONCURRENCY
    try:
        value = int(raw)
    except ValueError as error:
        raise ValueError(f"{ENV_MAX_CONCURRENCY} must be a positive integer, got {raw!r}") from error
    if value < 1:
        raise ValueError(f"{ENV_MAX_CONCURRENCY} must be a positive integer, got {raw!r}")
    return value


# ---------------------------------------------------------------------------------------------
# The pyfunc side: what `mlflow.pyfunc` callers may pass as model_input.


def requests_from_model_input(model_input: Any, params: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Normalise pyfunc input to a list of request dicts.

    Accepts one request dict, a list of them, a pandas DataFrame with one request per row (what
    MLflow's schema enforcement and `dataframe_records` produce) or a bare prompt string.
    `params` (MLflow inference params) fill in fields the request leaves out.
    """
    if isinstance(model_input, str):
        rows: list[Any] = [{"prompt": model_input}]
    elif isinstance(model_input, Mapping):
        rows = _columnar_rows(model_input) or [dict(model_input)]
    elif isinstance(model_input, list):
        rows = model_input
    elif hasattr(model_input, "to_dict"):  # a pandas DataFrame, without importing pandas here
        rows = [_drop_missing(row) for row in model_input.to_dict(orient="records")]
    else:
        raise InvalidRequestError(
            f"unsupported model input of type {type(model_input).__name__}: send a dict with 'messages' "
            f"or 'prompt', or a list of them"
        )
    requests: list[dict[str, Any]] = []
    for row in rows:
        if not isinstance(row, Mapping):
            raise InvalidRequestError(f"each request must be an object, got {type(row).__name__}")
        merged = {key: _plain(value) for key, value in (params or {}).items() if value is not None}
        merged.update({key: _plain(value) for key, value in row.items() if value is not None})
        requests.append(merged)
    return requests


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (what MLflow's `inputs` parser produces) as plain Python values."""
    return value.tolist() if hasattr(value, "tolist") else value


def _columnar_rows(columns: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """MLflow's `inputs` parser turns a list of requests into columns: {"prompt": [a, b], "max_tokens": [1, 2]}.

    Only a mapping whose values are all equally long lists, and whose `prompt` holds strings or
    whose `messages` holds lists, is read that way; a single chat request never looks like that.
    """
    # MLflow hands the columns over as numpy arrays.
    columns = {key: _plain(value) for key, value in columns.items()}
    if not columns or not all(isinstance(value, list) for value in columns.values()):
        return None
    lengths = {len(value) for value in columns.values()}
    if len(lengths) != 1 or lengths == {0}:
        return None
    prompts = columns.get("prompt")
    messages = columns.get("messages")
    if (prompts is not None and all(isinstance(item, str) for item in prompts)) or (
        messages is not None and all(isinstance(item, list) for item in messages)
    ):
        pass
    else:
        return None
    count = lengths.pop()
    return [{key: value[index] for key, value in columns.items()} for index in range(count)]


def _drop_missing(row: Mapping[str, Any]) -> dict[str, Any]:
    """DataFrame rows carry NaN where a request left a column out."""
    return {
        str(key): (value.tolist() if hasattr(value, "tolist") else value)
        for key, value in row.items()
        if not (isinstance(value, float) and math.isnan(value))
    }


def predict_with(engine: ChatEngine, model_input: Any, params: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """`PythonModel.predict`: one chat.completion dict per request, like MLflow's llm/v1/chat flavor."""
    requests = [parse_chat_request(raw, engine.defaults) for raw in requests_from_model_input(model_input, params)]
    return [chat_completion(engine.complete(request), model=engine.model_id) for request in requests]


def predict_stream_with(
    engine: ChatEngine, model_input: Any, params: Mapping[str, Any] | None
) -> Iterator[dict[str, Any]]:
    """`PythonModel.predict_stream`: chat.completion.chunk dicts as tokens are generated."""
    raw_requests = requests_from_model_input(model_input, params)
    if len(raw_requests) != 1:
        raise InvalidRequestError(f"streaming takes exactly one request, got {len(raw_requests)}")
    request = parse_chat_request(raw_requests[0], engine.defaults)
    events = engine.stream(request)  # validates before the first chunk
    return stream_chunks(events, model=engine.model_id)


def role_chunk(*, model: str, completion_id: str, created: int) -> dict[str, Any]:
    """The first chunk of every stream, as OpenAI sends it."""
    return chat_completion_chunk(completion_id=completion_id, created=created, model=model, role="assistant")


def event_chunks(event: StreamEvent, *, model: str, completion_id: str, created: int) -> list[dict[str, Any]]:
    """The chunks one stream event becomes: a content delta and/or the finish_reason with usage."""
    chunks: list[dict[str, Any]] = []
    if event.text:
        chunks.append(
            chat_completion_chunk(completion_id=completion_id, created=created, model=model, content=event.text)
        )
    if event.completion is not None:
        chunks.append(
            chat_completion_chunk(
                completion_id=completion_id,
                created=created,
                model=model,
                finish_reason=event.completion.finish_reason,
                usage=usage_dict(event.completion.prompt_tokens, event.completion.completion_tokens),
            )
        )
    return chunks


def stream_chunks(
    events: Iterator[StreamEvent], *, model: str, completion_id: str | None = None, created: int | None = None
) -> Iterator[dict[str, Any]]:
    """OpenAI's chunk sequence: the role first, then content deltas, then finish_reason and usage."""
    completion_id = completion_id or new_completion_id()
    created = int(time.time()) if created is None else created
    yield role_chunk(model=model, completion_id=completion_id, created=created)
    for event in events:
        yield from event_chunks(event, model=model, completion_id=completion_id, created=created)
