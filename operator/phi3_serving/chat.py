"""The chat request and response shapes shared by every model flavor and every endpoint.

Pure code: parsing and validating an OpenAI / MLflow `llm/v1/chat` style request into frozen
dataclasses, building `chat.completion` and `chat.completion.chunk` dicts, and filtering stop
sequences out of a token stream. The wrappers and the MLServer runtime both build on it, so a
request means the same thing whichever way it arrives.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Roles the chat templates of the models we serve understand. "developer" is OpenAI's newer
# name for "system"; "tool" carries tool results.
KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

# OpenAI allows at most four stop sequences; more only slows the stream filter down.
MAX_STOP_SEQUENCES = 4

# Environment variables the operator sets from `spec.generation`.
ENV_MAX_TOKENS = "PHI3_MAX_TOKENS"
ENV_TEMPERATURE = "PHI3_TEMPERATURE"
ENV_TOP_P = "PHI3_TOP_P"
ENV_TOP_K = "PHI3_TOP_K"


class InvalidRequestError(ValueError):
    """A request the model cannot serve as sent. The HTTP layer answers it with a 4xx.

    It subclasses ValueError so that plain `mlflow.pyfunc` callers get a familiar type.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class GenerationDefaults:
    """Request defaults, normally from `spec.generation` through the environment."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GenerationDefaults:
        """Read the PHI3_* variables; an unset or empty variable keeps the built-in default."""
        base = cls()
        try:
            max_tokens = int(env[ENV_MAX_TOKENS]) if env.get(ENV_MAX_TOKENS) else base.max_tokens
            temperature = float(env[ENV_TEMPERATURE]) if env.get(ENV_TEMPERATURE) else base.temperature
            top_p = float(env[ENV_TOP_P]) if env.get(ENV_TOP_P) else base.top_p
            top_k = int(env[ENV_TOP_K]) if env.get(ENV_TOP_K) else base.top_k
        except ValueError as error:
            raise ValueError(f"invalid generation default in the environment: {error}") from error
        defaults = cls(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        # The same bounds as a request, so a bad default fails at startup, not on every request.
        _check_options(defaults.max_tokens, defaults.temperature, defaults.top_p, defaults.top_k)
        return defaults


@dataclass(frozen=True)
class Guidance:
    """A grammar the answer must follow, in onnxruntime-genai's `set_guidance(kind, grammar)` terms."""

    kind: str  # "json_schema" (what we produce); the engine also knows "regex" and "lark_grammar"
    grammar: str
    param: str  # the request field it came from, named in errors

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any], param: str) -> Guidance:
        # llguidance lets a JSON answer grow whitespace without end, which a random or weak model
        # happily does until max_tokens cuts it off unparseable; compact JSON cannot.
        if "x-guidance" not in schema:
            schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
        return cls("json_schema", json.dumps(schema), param)


@dataclass(frozen=True)
class Tool:
    """One function the model may call (OpenAI's `tools[].function`)."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class GenerationOptions:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    guidance: Guidance | None = None
    # vLLM's extension: the end-of-sequence token is masked until this many tokens are generated.
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ChatRequest:
    """One validated request: either chat `messages` or a raw `prompt`, never both."""

    messages: tuple[ChatMessage, ...] | None
    prompt: str | None
    options: GenerationOptions
    stream: bool = False
    model: str | None = None
    # Functions the model is told about; `forced_tools` is the subset its answer must call
    # (tool_choice "required" or a named function), enforced through guidance.
    tools: tuple[Tool, ...] = ()
    forced_tools: tuple[Tool, ...] = ()
    # stream_options.include_usage: usage goes in an extra last chunk with no choices.
    include_usage: bool = False

    def messages_as_dicts(self) -> list[dict[str, str]]:
        """The messages for the chat template, with the tools described in the system message."""
        messages = [message.as_dict() for message in self.messages or ()]
        if self.tools:
            described = tools_system_prompt(self.tools)
            if messages and messages[0]["role"] in ("system", "developer"):
                messages[0] = {"role": messages[0]["role"], "content": f"{messages[0]['content']}\n{described}"}
            else:
                messages.insert(0, {"role": "system", "content": described})
        return messages


@dataclass(frozen=True)
class Completion:
    """What a model produced for one request, before it is shaped into an API response."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: tuple[ToolCall, ...] = ()


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_chat_request(payload: Any, defaults: GenerationDefaults) -> ChatRequest:
    """Validate one request body (already decoded from JSON) against the chat API."""
    if not isinstance(payload, Mapping):
        raise InvalidRequestError(
            f"the request must be a JSON object with 'messages' or 'prompt', got {type(payload).__name__}"
        )
    has_messages = payload.get("messages") is not None
    has_prompt = payload.get("prompt") is not None
    if has_messages and has_prompt:
        raise InvalidRequestError("send either 'messages' or 'prompt', not both", param="messages")
    if not has_messages and not has_prompt:
        raise InvalidRequestError("the request needs 'messages' (a chat) or 'prompt' (a text)", param="messages")
    messages = _parse_messages(payload["messages"]) if has_messages else None
    prompt = _parse_prompt(payload["prompt"]) if has_prompt else None

    n = payload.get("n")
    if n is not None and n != 1:
        raise InvalidRequestError("only n=1 is supported", param="n")
    _reject_unsupported(payload)
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequestError("'stream' must be true or false", param="stream")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError("'model' must be a string", param="model")
    tools, forced = _parse_tools(payload.get("tools"), payload.get("tool_choice"))
    guidance = _parse_response_format(payload.get("response_format"))
    if forced:
        if guidance is not None:
            raise InvalidRequestError(
                "'response_format' cannot be combined with a tool_choice that forces a tool call",
                param="response_format",
            )
        guidance = Guidance.json_schema(tool_call_schema(forced), "tools")
    options = parse_generation_options(payload, defaults)
    return ChatRequest(
        messages=messages,
        prompt=prompt,
        options=GenerationOptions(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            stop=options.stop,
            seed=_parse_seed(payload),
            guidance=guidance,
            min_tokens=_parse_min_tokens(payload, options.max_tokens),
        ),
        stream=stream,
        model=model,
        tools=tools,
        forced_tools=forced,
        include_usage=_parse_stream_options(payload.get("stream_options"), stream),
    )


# Fields whose non-default values would change the answer in ways we cannot honour. Anything
# else we do not know (user, metadata, store, service_tier, ...) cannot change the text and is
# accepted, as OpenAI-compatible servers do.
def _reject_unsupported(payload: Mapping[str, Any]) -> None:
    if payload.get("logprobs") not in (None, False):
        raise InvalidRequestError("'logprobs' is not supported by this server", param="logprobs")
    if payload.get("top_logprobs") is not None:
        raise InvalidRequestError("'top_logprobs' is not supported by this server", param="top_logprobs")
    if payload.get("logit_bias"):
        raise InvalidRequestError("'logit_bias' is not supported by this server", param="logit_bias")
    for key in ("presence_penalty", "frequency_penalty"):
        if payload.get(key) not in (None, 0, 0.0):
            raise InvalidRequestError(f"'{key}' is not supported by this server; leave it at 0", param=key)
    for key in ("functions", "function_call"):
        if payload.get(key) is not None:
            raise InvalidRequestError(f"'{key}' is deprecated and not supported; send 'tools'", param=key)
    best_of = payload.get("best_of")
    if best_of is not None and best_of != 1:
        raise InvalidRequestError("only best_of=1 is supported", param="best_of")
    if payload.get("echo") not in (None, False):
        raise InvalidRequestError("'echo' is not supported by this server", param="echo")
    if payload.get("suffix") not in (None, ""):
        raise InvalidRequestError("'suffix' is not supported by this server", param="suffix")


def _parse_min_tokens(payload: Mapping[str, Any], max_tokens: int) -> int:
    ignore_eos = payload.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InvalidRequestError("'ignore_eos' must be true or false", param="ignore_eos")
    value = _optional_int(payload, "min_tokens") or 0
    if ignore_eos:
        # vLLM's and llama.cpp's `ignore_eos`: generate max_tokens whatever the model says; stop
        # sequences still apply. Benchmarks send it so that every server generates the same length.
        if value not in (0, max_tokens):
            raise InvalidRequestError("'ignore_eos' generates max_tokens; leave 'min_tokens' out", param="ignore_eos")
        return max_tokens
    if not 0 <= value <= max_tokens:
        raise InvalidRequestError(f"'min_tokens' must be between 0 and max_tokens ({max_tokens})", param="min_tokens")
    return value


def _parse_stream_options(raw: Any, stream: bool) -> bool:
    if raw is None:
        return False
    if not stream:
        raise InvalidRequestError("'stream_options' is only allowed with stream: true", param="stream_options")
    if not isinstance(raw, Mapping):
        raise InvalidRequestError("'stream_options' must be an object", param="stream_options")
    include = raw.get("include_usage", False)
    if not isinstance(include, bool):
        raise InvalidRequestError(
            "'stream_options.include_usage' must be true or false", param="stream_options.include_usage"
        )
    return include


def _check_schema(schema: Any, param: str) -> None:
    """The shape only: the engine compiles the schema (and names what is wrong) before generating."""
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"'{param}' must be a JSON Schema object", param=param)


def _parse_response_format(raw: Any) -> Guidance | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidRequestError("'response_format' must be an object", param="response_format")
    kind = raw.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Guidance.json_schema({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, Mapping):
            raise InvalidRequestError(
                "'response_format.json_schema' must be an object with 'name' and 'schema'",
                param="response_format.json_schema",
            )
        schema = spec.get("schema")
        if schema is None:
            schema = {}
        _check_schema(schema, "response_format.json_schema.schema")
        return Guidance.json_schema(schema, "response_format.json_schema.schema")
    raise InvalidRequestError(
        f"'response_format.type' must be text, json_object or json_schema, got {kind!r}",
        param="response_format.type",
    )


def _parse_tools(raw_tools: Any, raw_choice: Any) -> tuple[tuple[Tool, ...], tuple[Tool, ...]]:
    """The tools, and the ones the answer is forced to call."""
    if raw_tools is None or raw_tools == []:
        if raw_choice not in (None, "none", "auto"):
            raise InvalidRequestError("'tool_choice' needs 'tools'", param="tool_choice")
        return (), ()
    if not isinstance(raw_tools, list):
        raise InvalidRequestError("'tools' must be a list of function tools", param="tools")
    tools: list[Tool] = []
    for index, item in enumerate(raw_tools):
        where = f"tools[{index}]"
        function = item.get("function") if isinstance(item, Mapping) else None
        if not isinstance(item, Mapping) or item.get("type") != "function" or not isinstance(function, Mapping):
            raise InvalidRequestError(f"{where} must be {{type: function, function: {{name, ...}}}}", param=where)
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"{where}.function.name must be a non-empty string", param=where)
        if any(tool.name == name for tool in tools):
            raise InvalidRequestError(f"{where}.function.name {name!r} is used twice", param=where)
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        _check_schema(parameters, f"{where}.function.parameters")
        description = function.get("description") or ""
        tools.append(Tool(name=name, description=str(description), parameters=dict(parameters)))
    choice = "auto" if raw_choice is None else raw_choice
    if choice == "none":
        return (), ()  # the model is not told about tools it may not call
    if choice == "auto":
        return tuple(tools), ()
    if choice == "required":
        return tuple(tools), tuple(tools)
    named = choice.get("function", {}).get("name") if isinstance(choice, Mapping) else None
    if not isinstance(named, str):
        raise InvalidRequestError(
            "'tool_choice' must be none, auto, required or {type: function, function: {name}}",
            param="tool_choice",
        )
    for tool in tools:
        if tool.name == named:
            return tuple(tools), (tool,)
    known = ", ".join(tool.name for tool in tools)
    raise InvalidRequestError(
        f"'tool_choice' names the function {named!r}, which is not in 'tools' ({known})", param="tool_choice"
    )


def tool_call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """The JSON a forced tool call is generated as: {"name": ..., "arguments": {...}}."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": _closed(tool.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _closed(schema: Mapping[str, Any]) -> dict[str, Any]:
    """An object schema that allows no argument it does not declare, unless it says otherwise.

    A function cannot take arguments it does not declare, and a weak model invents them freely.
    """
    closed = dict(schema)
    if closed.get("type") == "object" and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def parse_tool_call(text: str, tools: Sequence[Tool]) -> ToolCall | None:
    """The tool call in a generated answer, or None when the answer is not one."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # a model may generate anything
        return None
    if not isinstance(value, Mapping) or not any(tool.name == value.get("name") for tool in tools):
        return None
    arguments = value.get("arguments", {})
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}", name=str(value["name"]), arguments=json.dumps(arguments)
    )


def tools_system_prompt(tools: Sequence[Tool]) -> str:
    """How the model learns about the tools: a system message listing them and the call format."""
    listed = json.dumps(
        [{"name": tool.name, "description": tool.description, "parameters": tool.parameters} for tool in tools]
    )
    return (
        f"You can call these functions: {listed}\n"
        'To call one, answer only with JSON: {"name": <function name>, "arguments": <arguments object>}.'
    )


def parse_generation_options(payload: Mapping[str, Any], defaults: GenerationDefaults) -> GenerationOptions:
    """Read max_tokens, temperature, top_p, top_k and stop; absent or null ones take the defaults."""
    max_tokens = _optional_int(payload, "max_tokens")
    if max_tokens is None:
        # OpenAI's newer name for the same limit.
        max_tokens = _optional_int(payload, "max_completion_tokens")
    temperature = _optional_float(payload, "temperature")
    top_p = _optional_float(payload, "top_p")
    top_k = _optional_int(payload, "top_k")
    options = GenerationOptions(
        max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=defaults.top_k if top_k is None else top_k,
        stop=_parse_stop(payload.get("stop")),
    )
    _check_options(options.max_tokens, options.temperature, options.top_p, options.top_k)
    return options


def _check_options(max_tokens: int, temperature: float, top_p: float, top_k: int | None) -> None:
    if max_tokens < 1:
        raise InvalidRequestError(f"'max_tokens' must be at least 1, got {max_tokens}", param="max_tokens")
    if not 0.0 <= temperature <= 2.0:
        raise InvalidRequestError(f"'temperature' must be between 0 and 2, got {temperature}", param="temperature")
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequestError(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    if top_k is not None and top_k < 0:
        raise InvalidRequestError(f"'top_k' must be 0 or more, got {top_k}", param="top_k")


def _parse_messages(raw: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list):
        raise InvalidRequestError("'messages' must be a list of {role, content} objects", param="messages")
    if not raw:
        raise InvalidRequestError("'messages' must not be empty", param="messages")
    messages: list[ChatMessage] = []
    for index, item in enumerate(raw):
        where = f"messages[{index}]"
        if not isinstance(item, Mapping):
            raise InvalidRequestError(f"{where} must be an object with 'role' and 'content'", param=where)
        role = item.get("role")
        if not isinstance(role, str) or role not in KNOWN_ROLES:
            known = ", ".join(sorted(KNOWN_ROLES))
            raise InvalidRequestError(f"{where} has unknown role {role!r}; known roles: {known}", param=where)
        content = _message_text(item.get("content"), where)
        calls = item.get("tool_calls")
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise InvalidRequestError(f"{where}.tool_calls must be a list", param=where)
            # A previous tool call goes back to the model in the form it was generated in.
            content = content + "".join(_tool_call_text(call, where) for call in calls)
        messages.append(ChatMessage(role=role, content=content))
    return tuple(messages)


def _tool_call_text(call: Any, where: str) -> str:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidRequestError(f"{where}.tool_calls must hold {{function: {{name, arguments}}}}", param=where)
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except (json.JSONDecodeError, RecursionError):  # JSON in a string: the guard's depth scan skips strings
        raise InvalidRequestError(f"{where}.tool_calls arguments must be JSON", param=where) from None
    return json.dumps({"name": function["name"], "arguments": parsed})


def _message_text(content: Any, where: str) -> str:
    """Plain text content, or OpenAI's list of content parts when every part is text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise InvalidRequestError(f"{where}.content may only hold text parts", param=where)
        return "".join(texts)
    raise InvalidRequestError(f"{where}.content must be a string", param=where)


def _parse_prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1:
        # MLflow's completions schema allows a one-element list.
        raw = raw[0]
    if not isinstance(raw, str):
        raise InvalidRequestError("'prompt' must be a string", param="prompt")
    if not raw:
        raise InvalidRequestError("'prompt' must not be empty", param="prompt")
    if "\x00" in raw:
        # The engines' tokenizers take C strings: a NUL would cut the prompt short (to nothing, a 500).
        raise InvalidRequestError("'prompt' must not contain NUL characters", param="prompt")
    return raw


def _parse_stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
        raise InvalidRequestError("'stop' must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequestError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop")
    return tuple(dict.fromkeys(stops))


def _optional_int(payload: Mapping[str, Any], key: str) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    # bool is an int in Python, but `"max_tokens": true` is a client bug worth naming; and
    # int() of Infinity or NaN (which Python's json reads) would raise instead of saying so.
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise InvalidRequestError(f"'{key}' must be an integer, got {value!r}", param=key)
    return int(value)


def _parse_seed(payload: Mapping[str, Any]) -> int | None:
    """OpenAI's seed is a 64-bit integer (vLLM enforces the same range); torch refuses larger ones."""
    seed = _optional_int(payload, "seed")
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise InvalidRequestError(f"'seed' must be a 64-bit integer, got {seed}", param="seed")
    return seed


def _optional_float(payload: Mapping[str, Any], key: str) -> float | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError(f"'{key}' must be a number, got {value!r}", param=key)
    return float(value)


# ---------------------------------------------------------------------------------------------
# Response shapes (OpenAI's, which MLflow's llm/v1/chat also uses)


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    completion: Completion, *, model: str, completion_id: str | None = None, created: int | None = None
) -> dict[str, Any]:
    return {
        "id": completion_id or new_completion_id(),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": _message(completion),
                "finish_reason": completion.finish_reason,
            }
        ],
        "usage": usage_dict(completion.prompt_tokens, completion.completion_tokens),
    }


def _message(completion: Completion) -> dict[str, Any]:
    if completion.tool_calls:
        return {"role": "assistant", "content": None, "tool_calls": [call.as_dict() for call in completion.tool_calls]}
    return {"role": "assistant", "content": completion.text}


def text_completion(
    completion: Completion, *, model: str, completion_id: str | None = None, created: int | None = None
) -> dict[str, Any]:
    """The legacy `/v1/completions` answer."""
    return {
        "id": completion_id or new_text_completion_id(),
        "object": "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": 0, "text": completion.text, "logprobs": None, "finish_reason": completion.finish_reason}],
        "usage": usage_dict(completion.prompt_tokens, completion.completion_tokens),
    }


def text_completion_chunk(
    *, completion_id: str, created: int, model: str, text: str, finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def new_text_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage_chunk(
    *, completion_id: str, created: int, model: str, object_name: str, usage: Mapping[str, int]
) -> dict[str, Any]:
    """stream_options.include_usage: the last chunk, with no choices, carries the usage."""
    return {
        "id": completion_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": [],
        "usage": dict(usage),
    }


def chat_completion_chunk(
    *,
    completion_id: str,
    created: int,
    model: str,
    content: str | None = None,
    role: str | None = None,
    finish_reason: str | None = None,
    usage: Mapping[str, int] | None = None,
    tool_calls: Sequence[ToolCall] = (),
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = [{"index": index, **call.as_dict()} for index, call in enumerate(tool_calls)]
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage is not None:
        chunk["usage"] = dict(usage)
    return chunk


def error_body(
    message: str,
    *,
    error_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """OpenAI's error envelope, which its SDK turns into a readable exception."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Stop sequences


class StopSequenceFilter:
    """Cuts a text stream at the first stop sequence, across token boundaries.

    Text that could still turn out to be the start of a stop sequence is held back until the
    next piece decides it, so a client never sees part of a stop sequence.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Take the next piece of text; return what can be shown now."""
        if self.stopped:
            return ""
        if not self._stops:
            return piece
        text = self._held + piece
        cut = _first_stop_index(text, self._stops)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = _longest_stop_prefix_suffix(text, self._stops)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The text held back when the stream ends without a stop sequence."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _first_stop_index(text: str, stops: Iterable[str]) -> int | None:
    found = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(found) if found else None


def _longest_stop_prefix_suffix(text: str, stops: Iterable[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop sequence."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
