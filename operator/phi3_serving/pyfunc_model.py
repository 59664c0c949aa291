"""Any MLflow pyfunc a user logged with MLflow's own APIs, and which OpenAI endpoints it gets.

The shape is read from the model's metadata, never guessed from an answer:
- `chat`: MLflow's chat tasks (`llm/v1/chat`, `agent/v1/chat`), a `ChatModel`, or an input
  signature with a `messages` column -> `/v1/chat/completions`;
- `responses`: a `ResponsesAgent` (task `agent/v1/responses`) -> `/v1/responses`;
- `prompt`: one string input named `prompt` (the Phi-3 + MLflow recipe's wrapper) ->
  `/v1/completions`;
- `generic`: anything else -> `/invocations` and V2 only.

`PyfuncChatEngine` puts a chat- or prompt-shaped pyfunc behind the same ChatEngine interface as
our own engines, so the HTTP layer, the metrics and the V2 path stay one piece of code. It
streams through the model's `predict_stream` when the model declares one (MLflow records
`streamable` in the flavor config), and otherwise sends the whole answer as one chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from phi3_serving.chat import (
    ChatRequest,
    Completion,
    GenerationDefaults,
    InvalidRequestError,
)
from phi3_serving.engine import StreamEvent
from phi3_serving.metrics import ModelMetrics, RequestMeter

Shape = Literal["chat", "responses", "prompt", "generic"]
CHAT_TASKS = frozenset({"llm/v1/chat", "agent/v1/chat", "agent/v2/chat"})
RESPONSES_TASKS = frozenset({"agent/v1/responses"})
# What each shape answers beside /invocations and V2, and the OpenAI endpoint a shape's calls go to.
OPENAI_ENDPOINTS: Mapping[Shape, frozenset[str]] = {
    "chat": frozenset({"chat"}),
    "prompt": frozenset({"text"}),
    "responses": frozenset({"responses"}),
    "generic": frozenset(),
}
ENDPOINT_PATHS = {"chat": "/v1/chat/completions", "text": "/v1/completions", "responses": "/v1/responses"}
# The chat request fields MLflow's chat schema (ChatParams) accepts beside `messages`.
_CHAT_PARAM_FIELDS = ("temperature", "max_tokens", "stop", "top_p", "top_k")
# Request fields a pyfunc cannot honour: it has no guidance and no tool parser of ours.
_UNSUPPORTED_FIELDS = ("tools", "response_format")


@dataclass(frozen=True)
class ModelShape:
    shape: Shape
    why: str  # what in the metadata decided it, named in errors and logs
    streamable: bool
    input_columns: tuple[str, ...]
    param_names: tuple[str, ...]


def model_shape(metadata: Any, python_model: Any | None = None) -> ModelShape:
    """The shape of a loaded pyfunc, from its MLmodel metadata and the interface its class implements."""
    task = str((getattr(metadata, "metadata", None) or {}).get("task") or "")
    pyfunc_conf = (getattr(metadata, "flavors", None) or {}).get("python_function", {})
    streamable = bool(pyfunc_conf.get("streamable"))
    columns, params = _schema_names(metadata)

    def shape(kind: Shape, why: str) -> ModelShape:
        return ModelShape(kind, why, streamable, columns, params)

    interface = _interface(python_model)
    if task in RESPONSES_TASKS or interface == "ResponsesAgent":
        return shape("responses", f"task {task}" if task else "it is a ResponsesAgent")
    if task in CHAT_TASKS:
        return shape("chat", f"task {task}")
    if interface in ("ChatModel", "ChatAgent"):
        return shape("chat", f"it is a {interface}")
    if "messages" in columns:
        return shape("chat", "its signature's input is 'messages'")
    if columns == ("prompt",):
        return shape("prompt", "its signature's one input is the string 'prompt'")
    described = f"inputs {', '.join(columns)}" if columns else "no input signature"
    return shape("generic", f"{described}: not a chat ('messages'), prompt ('prompt') or agent model")


def unsupported_endpoint_message(shape: ModelShape, endpoint: str, model: str) -> str:
    """Why this model does not answer this OpenAI endpoint, and where its calls go instead."""
    offered = sorted(ENDPOINT_PATHS[e] for e in OPENAI_ENDPOINTS[shape.shape])
    instead = ", ".join([*offered, "/invocations", f"/v2/models/{model}/infer"])
    return f"{ENDPOINT_PATHS[endpoint]} is not available for '{model}' ({shape.why}); it serves {instead}"


def _interface(python_model: Any | None) -> str:
    if python_model is None:
        return ""
    names = {cls.__name__ for cls in type(python_model).__mro__ if cls.__module__.startswith("mlflow.")}
    for name in ("ResponsesAgent", "ChatAgent", "ChatModel"):
        if name in names:
            return name
    return ""


def _schema_names(metadata: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    signature = getattr(metadata, "signature", None)
    if signature is None:
        return (), ()
    inputs = signature.inputs
    columns: tuple[str, ...] = ()
    if inputs is not None and getattr(inputs, "has_input_names", lambda: False)():
        columns = tuple(str(name) for name in inputs.input_names())
    params = signature.params
    names = tuple(str(p.name) for p in params.params) if params is not None else ()
    return columns, names


# ---------------------------------------------------------------------------------------------
# Chat- and prompt-shaped pyfuncs behind the ChatEngine interface


class PyfuncChatEngine:
    """Calls a chat- or prompt-shaped pyfunc's `predict`/`predict_stream`; thread-safe as the model is."""

    def __init__(
        self,
        pyfunc_model: Any,
        shape: ModelShape,
        *,
        name: str,
        defaults: GenerationDefaults,
        metrics: ModelMetrics | None = None,
    ) -> None:
        if shape.shape not in ("chat", "prompt"):
            raise ValueError(f"a {shape.shape} model has no chat engine")
        self._model = pyfunc_model
        self.shape = shape
        self._model_id = f"pyfunc/{shape.shape}"
        self._name = name
        self._defaults = defaults
        self.metrics = metrics

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def defaults(self) -> GenerationDefaults:
        return self._defaults

    def describe(self) -> str:
        streams = "streams through predict_stream" if self.shape.streamable else "answers in one chunk"
        return f"MLflow pyfunc, {self.shape.shape}-shaped ({self.shape.why}); {streams}"

    def complete(self, request: ChatRequest) -> Completion:
        model_input, params = self._model_call(request)
        meter = RequestMeter(self.metrics, 0)
        try:
            answer = self._model.predict(model_input, params=params)
            completion = completion_from_answer(answer)
            meter.token()
        finally:
            meter.finish("stop")
        return completion

    def stream(self, request: ChatRequest) -> Iterator[StreamEvent]:
        call = self._model_call(request)  # validates before the caller commits to a stream
        return self._stream(*call)

    def _stream(self, model_input: Any, params: dict[str, Any] | None) -> Iterator[StreamEvent]:
        meter = RequestMeter(self.metrics, 0)
        pieces: list[str] = []
        finish_reason = "stop"
        usage: tuple[int, int] | None = None
        try:
            if not self.shape.streamable:
                completion = completion_from_answer(self._model.predict(model_input, params=params))
                meter.token()
                yield StreamEvent(completion.text)
                yield StreamEvent("", completion)
                return
            for chunk in self._model.predict_stream(model_input, params=params):
                text, reason, chunk_usage = _chunk_parts(chunk)
                finish_reason = reason or finish_reason
                usage = chunk_usage or usage
                if text:
                    meter.token()
                    pieces.append(text)
                    yield StreamEvent(text)
            prompt_tokens, completion_tokens = usage or (0, len(pieces))
            yield StreamEvent("", Completion("".join(pieces), finish_reason, prompt_tokens, completion_tokens))
        finally:
            meter.finish(finish_reason)

    def _model_call(self, request: ChatRequest) -> tuple[Any, dict[str, Any] | None]:
        for field in _UNSUPPORTED_FIELDS:
            if (field == "tools" and request.tools) or (field == "response_format" and request.options.guidance):
                raise InvalidRequestError(
                    f"'{field}' is not supported by '{self._name}': it is an MLflow pyfunc ({self.shape.why}), "
                    "which takes no tools or output schema from the request",
                    param=field,
                )
        options = request.options
        option_values: dict[str, Any] = {
            "temperature": options.temperature,
            "max_tokens": options.max_tokens,
            "top_p": options.top_p,
        }
        if options.top_k is not None:
            option_values["top_k"] = options.top_k
        if options.stop:
            option_values["stop"] = list(options.stop)
        params = {key: value for key, value in option_values.items() if key in self.shape.param_names} or None
        if self.shape.shape == "prompt":
            if request.prompt is None:
                raise InvalidRequestError(f"'{self._name}' takes a 'prompt' ({self.shape.why})", param="messages")
            return {"prompt": request.prompt}, params
        if request.messages is None:
            raise InvalidRequestError(f"'{self._name}' takes 'messages' ({self.shape.why})", param="prompt")
        chat_input: dict[str, Any] = {"messages": request.messages_as_dicts()}
        # MLflow's chat schema (ChatModel, the chat tasks) carries the generation options beside the messages.
        accepted = set(self.shape.input_columns) & set(_CHAT_PARAM_FIELDS)
        chat_input.update({key: value for key, value in option_values.items() if key in accepted})
        return chat_input, params


def completion_from_answer(answer: Any) -> Completion:
    """Our Completion from what a chat- or prompt-shaped pyfunc returned.

    Accepted: a chat.completion dict (MLflow's ChatModel, the transformers chat task), a list
    holding one, a string, a list or pandas column of strings, or a one-row DataFrame.
    """
    if hasattr(answer, "to_dict") and hasattr(answer, "columns"):  # a DataFrame
        records = answer.to_dict(orient="records")
        answer = records[0] if len(records) == 1 else records
        if isinstance(answer, Mapping) and len(answer) == 1:
            answer = next(iter(answer.values()))
    if hasattr(answer, "tolist"):  # numpy array or pandas Series
        answer = answer.tolist()
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, str):
        return Completion(answer, "stop", 0, 1 if answer else 0)
    if isinstance(answer, Mapping) and isinstance(answer.get("choices"), Sequence) and answer["choices"]:
        choice = answer["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") if isinstance(message, Mapping) else None
        if text is None:
            text = choice.get("text", "")
        usage = answer.get("usage") or {}
        return Completion(
            str(text or ""),
            str(choice.get("finish_reason") or "stop"),
            int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0),
        )
    raise InvalidRequestError(
        f"the model answered with {type(answer).__name__}, which is neither a chat completion nor text",
        code="unexpected_model_output",
    )


def _chunk_parts(chunk: Any) -> tuple[str, str | None, tuple[int, int] | None]:
    """(text, finish_reason, usage) of one predict_stream chunk: a chat.completion.chunk dict, or text."""
    if isinstance(chunk, str):
        return chunk, None, None
    if isinstance(chunk, Mapping):
        choices = chunk.get("choices") or []
        text = ""
        reason: str | None = None
        if choices:
            delta = choices[0].get("delta") or choices[0].get("message") or {}
            text = str(delta.get("content") or "") if isinstance(delta, Mapping) else ""
            reason = choices[0].get("finish_reason")
        usage = chunk.get("usage")
        counts = (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)) if usage else None
        return text, reason, counts
    completion = completion_from_answer(chunk)
    return completion.text, None, None


# ---------------------------------------------------------------------------------------------
# ResponsesAgent: OpenAI's Responses API


def responses_agent_input(body: Mapping[str, Any]) -> dict[str, Any]:
    """The ResponsesAgentRequest for an OpenAI `POST /v1/responses` body."""
    raw = body.get("input")
    if isinstance(raw, str):
        items: list[Any] = [{"role": "user", "content": raw}]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise InvalidRequestError("'input' must be a string or a non-empty list of items", param="input")
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        items = [{"role": "system", "content": instructions}, *items]
    request: dict[str, Any] = {"input": items}
    for key in ("custom_inputs", "context"):
        if isinstance(body.get(key), Mapping):
            request[key] = body[key]
    return request


def response_object(
    output: Sequence[Mapping[str, Any]], *, response_id: str, model: str, created: int, status: str = "completed"
) -> dict[str, Any]:
    """An OpenAI Response object around the agent's output items."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": [dict(item) for item in output],
        "parallel_tool_calls": False,
        "tool_choice": "auto",
        "tools": [],
        "error": None,
        "incomplete_details": None,
    }


class ResponsesStreamShaper:
    """OpenAI's Responses stream events around what a ResponsesAgent's `predict_stream` yields."""

    def __init__(self, *, response_id: str, model: str) -> None:
        self._id = response_id
        self._model = model
        self._created = int(time.time())
        self._sequence = 0
        self._items: list[Mapping[str, Any]] = []
        self._item_index: dict[str, int] = {}

    def _event(self, payload: dict[str, Any]) -> dict[str, Any]:
        payload["sequence_number"] = self._sequence
        self._sequence += 1
        return payload

    def _response(self, status: str) -> dict[str, Any]:
        return response_object(
            self._items, response_id=self._id, model=self._model, created=self._created, status=status
        )

    def opening(self) -> list[dict[str, Any]]:
        return [self._event({"type": "response.created", "response": self._response("in_progress")})]

    def events(self, agent_event: Mapping[str, Any]) -> list[dict[str, Any]]:
        kind = agent_event.get("type")
        if kind == "response.output_text.delta":
            item_id = str(agent_event.get("item_id") or "")
            index = self._item_index.setdefault(item_id, len(self._item_index))
            return [
                self._event(
                    {
                        "type": kind,
                        "item_id": item_id,
                        "output_index": index,
                        "content_index": 0,
                        "delta": str(agent_event.get("delta") or ""),
                        "logprobs": [],
                    }
                )
            ]
        if kind == "response.output_item.done" and isinstance(agent_event.get("item"), Mapping):
            item = agent_event["item"]
            item_id = str(item.get("id") or "")
            index = self._item_index.setdefault(item_id, len(self._item_index))
            self._items.append(item)
            return [self._event({"type": kind, "output_index": index, "item": dict(item)})]
        return []

    def closing(self) -> list[dict[str, Any]]:
        return [self._event({"type": "response.completed", "response": self._response("completed")})]

    def error(self, message: str) -> dict[str, Any]:
        return self._event({"type": "error", "code": "server_error", "message": message, "param": None})
