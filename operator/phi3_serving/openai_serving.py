"""OpenAI's response shapes for what an engine streams: the serving layer between engine and HTTP.

Pure code, as vLLM splits it: `chat` parses requests (protocol), this module turns an engine's
StreamEvents into `chat.completion(.chunk)` and legacy `text_completion` bodies, and `runtime`
only routes HTTP. Tool calls are decided when the answer is complete (it must parse as a call
of one of the request's tools), so a request with tools streams its answer as one last delta.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

from phi3_serving.chat import (
    ChatRequest,
    Completion,
    InvalidRequestError,
    chat_completion,
    chat_completion_chunk,
    error_body,
    new_completion_id,
    new_text_completion_id,
    text_completion,
    text_completion_chunk,
    usage_chunk,
    usage_dict,
)
from phi3_serving.engine import StreamEvent, with_tool_calls

Endpoint = Literal["chat", "text"]


def check_model(request: ChatRequest, served_name: str) -> dict[str, Any] | None:
    """OpenAI's 404 body for a request naming a model this server does not serve, else None."""
    return check_model_name(request.model, served_name)


def check_model_name(requested: str | None, served_name: str) -> dict[str, Any] | None:
    if requested is None or requested == served_name:
        return None
    return error_body(
        f"The model '{requested}' does not exist; this server serves '{served_name}' (see GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def check_text_request(payload: Any) -> None:
    """The legacy completions endpoint takes a prompt, not a chat."""
    if isinstance(payload, Mapping) and payload.get("messages") is not None:
        raise InvalidRequestError(
            "/v1/completions takes 'prompt'; send chats to /v1/chat/completions", param="messages"
        )
    if isinstance(payload, Mapping) and payload.get("prompt") is None:
        raise InvalidRequestError("/v1/completions needs 'prompt'", param="prompt")
    for key in ("tools", "response_format"):
        if isinstance(payload, Mapping) and payload.get(key) is not None:
            raise InvalidRequestError(f"'{key}' belongs to /v1/chat/completions", param=key)


def response_body(endpoint: Endpoint, completion: Completion, *, model: str) -> dict[str, Any]:
    if endpoint == "text":
        return text_completion(completion, model=model)
    return chat_completion(completion, model=model)


class StreamShaper:
    """The chunks of one streamed answer, in OpenAI's order."""

    def __init__(self, endpoint: Endpoint, request: ChatRequest, *, model: str) -> None:
        self._endpoint = endpoint
        self._request = request
        self._model = model
        self._id = new_text_completion_id() if endpoint == "text" else new_completion_id()
        self._created = int(time.time())
        self._held: list[str] | None = [] if endpoint == "chat" and request.tools else None

    def opening(self) -> list[dict[str, Any]]:
        if self._endpoint == "text":
            return []
        return [
            chat_completion_chunk(completion_id=self._id, created=self._created, model=self._model, role="assistant")
        ]

    def chunks(self, event: StreamEvent) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if event.text:
            if self._held is not None:
                self._held.append(event.text)  # it may turn out to be a tool call
            else:
                out.append(self._content(event.text))
        if event.completion is not None:
            out.extend(self._closing(event.completion))
        return out

    def error(self, message: str) -> dict[str, Any]:
        return error_body(message, error_type="server_error")

    def _content(self, text: str) -> dict[str, Any]:
        if self._endpoint == "text":
            return text_completion_chunk(completion_id=self._id, created=self._created, model=self._model, text=text)
        return chat_completion_chunk(completion_id=self._id, created=self._created, model=self._model, content=text)

    def _closing(self, completion: Completion) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._held is not None:
            text = "".join(self._held)
            completion = with_tool_calls(
                Completion(text, completion.finish_reason, completion.prompt_tokens, completion.completion_tokens),
                self._request,
            )
            if completion.tool_calls:
                out.append(
                    chat_completion_chunk(
                        completion_id=self._id, created=self._created, model=self._model,
                        tool_calls=completion.tool_calls,
                    )
                )
            elif text:
                out.append(self._content(text))
        usage = usage_dict(completion.prompt_tokens, completion.completion_tokens)
        include_usage = self._request.include_usage
        if self._endpoint == "text":
            final = text_completion_chunk(
                completion_id=self._id, created=self._created, model=self._model, text="",
                finish_reason=completion.finish_reason,
            )
            if not include_usage:
                final["usage"] = usage
        else:
            final = chat_completion_chunk(
                completion_id=self._id, created=self._created, model=self._model,
                finish_reason=completion.finish_reason, usage=None if include_usage else usage,
            )
        out.append(final)
        if include_usage:
            object_name = "text_completion" if self._endpoint == "text" else "chat.completion.chunk"
            out.append(
                usage_chunk(
                    completion_id=self._id, created=self._created, model=self._model, object_name=object_name,
                    usage=usage,
                )
            )
        return out
