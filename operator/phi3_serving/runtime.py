"""The MLServer runtime: V2 inference plus OpenAI's chat and completions APIs and MLflow's /invocations.

Kept thin on purpose (MLServer 1.7.1 is its last release): loading and generation live in
`loading`, `engine` and the flavor modules, so this class could move to another server.

Generation never runs on the event loop. Each request takes a thread from a pool as large as
the model's concurrency bound; streamed tokens cross back to the loop through a queue. The
server must run with `parallel_workers: 0` and `gzip_enabled: false` for the streams to flow
(`phi3_serving.serve` writes those settings).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.errors import MLServerError
from mlserver.handlers import custom_handler
from mlserver.logging import logger
from mlserver.types import InferenceRequest, InferenceResponse, RequestInput, ResponseOutput
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from phi3_serving.chat import (
    ChatRequest,
    Completion,
    InvalidRequestError,
    chat_completion,
    error_body,
    parse_chat_request,
)
from phi3_serving.engine import ChatEngine, StreamEvent
from phi3_serving.loading import ServedModel, load_served_model
from phi3_serving.openai_serving import Endpoint, StreamShaper, check_model, check_text_request, response_body

# The V2 request parameters we read as generation options.
_V2_OPTION_KEYS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop")
_LLM_INPUT_KEYS = ("messages", "prompt")


# Models that failed to load in this process (MLServer itself only logs it).
LOAD_FAILURES: list[str] = []

_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Response]])


def _route(path: str, method: str = "POST") -> Callable[[_Handler], _Handler]:
    """MLServer's `custom_handler`, typed: MLServer mounts the method on its FastAPI app at `path`."""
    return cast(Callable[[_Handler], _Handler], custom_handler(rest_path=path, rest_method=method))


class _Finished:
    """Marks the end of a threaded stream."""


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _ThreadedStream:
    """Runs `engine.stream` in the pool and hands its events to the event loop as they come.

    `started()` returns once the request is validated (or raises its error), so HTTP handlers
    can still answer 4xx before they commit to a 200 stream.

    Events that pile up while the loop is busy are handed over together: one wake-up of the
    loop per batch instead of one per token keeps a fast model from flooding the loop (and from
    fighting it for the GIL), so the first token leaves as early as possible.
    """

    _STARTED = object()

    def __init__(self, engine: ChatEngine, request: ChatRequest, pool: ThreadPoolExecutor) -> None:
        self._loop = asyncio.get_running_loop()
        self._pending: deque[object] = deque()
        self._lock = threading.Lock()
        self._wakeup_scheduled = False
        self._ready = asyncio.Event()
        self._cancelled = threading.Event()
        self._engine = engine
        self._request = request
        self._events: Iterator[StreamEvent] | None = None
        self._future = self._loop.run_in_executor(pool, self._produce)

    def _put(self, item: object) -> None:
        with self._lock:
            self._pending.append(item)
            wake = not self._wakeup_scheduled
            self._wakeup_scheduled = True
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop closed under us: the server is shutting down
                self._cancelled.set()

    async def _take(self) -> list[object]:
        while True:
            with self._lock:
                if self._pending:
                    items = list(self._pending)
                    self._pending.clear()
                    self._wakeup_scheduled = False
                    return items
                self._ready.clear()
            await self._ready.wait()

    def _produce(self) -> None:
        events: Iterator[StreamEvent] | None = None
        try:
            events = self._events = self._engine.stream(self._request)
            self._put(self._STARTED)
            for event in events:
                if self._cancelled.is_set():
                    break
                self._put(event)
            self._put(_Finished())
        except BaseException as error:
            self._put(_Failed(error))
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # releases the engine's concurrency slot at once

    async def started(self) -> None:
        items = await self._take()
        first, rest = items[0], items[1:]
        if isinstance(first, _Failed):
            raise first.error
        if first is not self._STARTED:
            raise RuntimeError("the stream ended before it started")
        with self._lock:
            self._pending.extendleft(reversed(rest))

    async def batches(self) -> AsyncGenerator[list[StreamEvent], None]:
        """The events in the batches they arrived in; raises the engine's error, if any."""
        try:
            while True:
                batch: list[StreamEvent] = []
                for item in await self._take():
                    if isinstance(item, _Failed):
                        if batch:
                            yield batch
                        raise item.error
                    if isinstance(item, _Finished):
                        if batch:
                            yield batch
                        return
                    assert isinstance(item, StreamEvent)
                    batch.append(item)
                yield batch
        finally:
            # The client went away (or we are done): stop generating for nobody.
            self._cancelled.set()
            cancel = getattr(self._events, "cancel", None)
            if cancel is not None:
                cancel()  # ends it now, even while it still waits for a batch slot


class Phi3Runtime(MLModel):  # type: ignore[misc]
    """Serves one model packaged by `phi3-operator package` (either flavor)."""

    async def load(self) -> bool:
        uri = self.settings.parameters.uri if self.settings.parameters else None
        if not uri:
            raise MLServerError(f"model {self.name} has no parameters.uri to load from", status_code=500)
        loop = asyncio.get_running_loop()
        # Loading reads hundreds of MB for a real model: keep the loop (and health probes) alive.
        try:
            self._served: ServedModel = await loop.run_in_executor(
                None, lambda: load_served_model(uri, name=self.name)
            )
        except Exception as error:
            # MLServer logs this and shuts down; `serve` reads it to exit non-zero with the reason.
            LOAD_FAILURES.append(f"{self.name}: {type(error).__name__}: {error}")
            raise
        self._engine: ChatEngine = self._served.engine
        describe = getattr(self._engine, "describe", None)
        if describe is not None:
            logger.info("%s: %s", self.name, describe())
        self._pool = ThreadPoolExecutor(
            max_workers=self._served.max_concurrency, thread_name_prefix=f"phi3-{self.name}"
        )
        self._created = int(time.time())
        return True

    async def unload(self) -> bool:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(getattr(self, "_engine", None), "close", None)
        if close is not None:
            close()  # the batching engine's scheduler thread
        return True

    # -- generation, off the loop --------------------------------------------------------------

    async def _complete(self, request: ChatRequest) -> Completion:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._engine.complete, request)

    async def _start_stream(self, request: ChatRequest) -> _ThreadedStream:
        stream = _ThreadedStream(self._engine, request, self._pool)
        await stream.started()
        return stream

    # -- V2 (Open Inference Protocol) ----------------------------------------------------------

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        request = self._v2_request(payload)
        try:
            completion = await self._complete(request)
        except InvalidRequestError as error:
            raise MLServerError(error.message, status_code=400) from error
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=_v2_outputs(completion.text, completion),
        )

    async def predict_stream(self, payloads: AsyncIterator[InferenceRequest]) -> AsyncIterator[InferenceResponse]:
        payload = await payloads.__anext__()
        request = self._v2_request(payload)
        try:
            stream = await self._start_stream(request)
        except InvalidRequestError as error:
            raise MLServerError(error.message, status_code=400) from error
        async for batch in stream.batches():
            for event in batch:
                yield InferenceResponse(
                    model_name=self.name,
                    model_version=self.version,
                    outputs=_v2_outputs(event.text, event.completion),
                )

    def _v2_request(self, payload: InferenceRequest) -> ChatRequest:
        """Inputs `messages` (BYTES, JSON objects or one JSON list) or `prompt` (BYTES); options as parameters."""
        raw: dict[str, Any] = {}
        for request_input in payload.inputs:
            if request_input.name in _LLM_INPUT_KEYS:
                raw[request_input.name] = _decode_v2_input(request_input)
            else:
                raise MLServerError(
                    f"unknown input {request_input.name!r}: send 'messages' (BYTES, JSON) or 'prompt' (BYTES)",
                    status_code=400,
                )
        if payload.parameters is not None:
            parameters = payload.parameters.model_dump(exclude_none=True)
            raw.update({key: parameters[key] for key in _V2_OPTION_KEYS if key in parameters})
        try:
            return parse_chat_request(raw, self._engine.defaults)
        except InvalidRequestError as error:
            raise MLServerError(error.message, status_code=400) from error

    # -- OpenAI ---------------------------------------------------------------------------------

    @_route("/v1/chat/completions")
    async def openai_chat_completions(self, request: Request) -> Response:
        return await self._openai(request, "chat")

    @_route("/v1/completions")
    async def openai_completions(self, request: Request) -> Response:
        """The legacy text-completion endpoint that evaluation harnesses and older clients call."""
        return await self._openai(request, "text")

    async def _openai(self, request: Request, endpoint: Endpoint) -> Response:
        body, problem = await _read_json(request)
        if problem is not None:
            return problem
        try:
            if endpoint == "text":
                check_text_request(body)
            chat_request = parse_chat_request(body, self._engine.defaults)
            missing = check_model(chat_request, self.name)
            if missing is not None:
                return JSONResponse(missing, status_code=404)
            if chat_request.stream:
                stream = await self._start_stream(chat_request)
                shaper = StreamShaper(endpoint, chat_request, model=self.name)
                return StreamingResponse(
                    self._sse(stream, shaper),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            completion = await self._complete(chat_request)
        except InvalidRequestError as error:
            return _invalid(error)
        return JSONResponse(response_body(endpoint, completion, model=self.name))

    async def _sse(self, stream: _ThreadedStream, shaper: StreamShaper) -> AsyncIterator[bytes]:
        yield b"".join(_sse_event(chunk) for chunk in shaper.opening())
        batches = stream.batches()
        try:
            async for batch in batches:
                # One write per batch: each event stays its own SSE chunk, as OpenAI clients expect.
                yield b"".join(_sse_event(chunk) for event in batch for chunk in shaper.chunks(event))
        except Exception as error:  # the 200 is already sent: tell the client in-band
            yield _sse_event(shaper.error(f"generation failed: {error}"))
        finally:
            await batches.aclose()
        yield b"data: [DONE]\n\n"

    @_route("/v1/models", "GET")
    async def openai_models(self, request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": self.name, "object": "model", "created": self._created, "owned_by": "phi3-operator"}],
            }
        )

    # -- MLflow scoring protocol ----------------------------------------------------------------

    @_route("/invocations")
    async def mlflow_invocations(self, request: Request) -> Response:
        """MLflow's `/invocations`: the chat form answers a list of chat.completion dicts, as MLflow does."""
        body, problem = await _read_json(request)
        if problem is not None:
            return problem
        if isinstance(body, dict) and any(key in body for key in _LLM_INPUT_KEYS):
            try:
                chat_request = parse_chat_request(body, self._engine.defaults)
                completion = await self._complete(chat_request)
            except InvalidRequestError as error:
                return _invalid(error)
            return JSONResponse([chat_completion(completion, model=self.name)])
        return await self._mlflow_scoring(await request.body(), request.headers.get("content-type", "application/json"))

    async def _mlflow_scoring(self, data: bytes, content_type: str) -> Response:
        """Every other MLflow payload (`inputs`, `instances`, `dataframe_*`) through MLflow's own parser."""
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc import scoring_server

        pyfunc_model = self._served.pyfunc

        def score() -> Any:
            return scoring_server.invocations(  # type: ignore[no-untyped-call]
                data, content_type, pyfunc_model, pyfunc_model.metadata.get_input_schema()
            )

        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._pool, score)
        except MlflowException as error:
            cause = error.__cause__ or error.__context__
            message = cause.message if isinstance(cause, InvalidRequestError) else error.message
            return JSONResponse(error_body(message.split("\n")[0]), status_code=400)
        return Response(content=result.response, status_code=result.status, media_type=result.mimetype)

    @_route("/ping", "GET")
    async def mlflow_ping(self, request: Request) -> Response:
        return Response(content="\n", media_type="application/json")


# ---------------------------------------------------------------------------------------------


async def _read_json(request: Request) -> tuple[Any, Response | None]:
    raw = await request.body()
    try:
        return json.loads(raw), None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, JSONResponse(
            error_body(f"the request body is not valid JSON: {error}", code="invalid_json"), status_code=400
        )


def _invalid(error: InvalidRequestError) -> Response:
    return JSONResponse(error_body(error.message, param=error.param, code=error.code), status_code=400)


def _sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def _decode_v2_input(request_input: RequestInput) -> Any:
    values = [value for value in StringCodec.decode_input(request_input)]
    if request_input.name == "prompt":
        return values[0] if len(values) == 1 else values
    # messages: each element a JSON object, or a single element holding the whole JSON list
    try:
        decoded = [json.loads(value) for value in values]
    except json.JSONDecodeError as error:
        raise MLServerError(f"input 'messages' must hold JSON: {error}", status_code=400) from error
    if len(decoded) == 1 and isinstance(decoded[0], list):
        return decoded[0]
    return decoded


def _v2_outputs(text: str, completion: Completion | None) -> list[ResponseOutput]:
    outputs = [StringCodec.encode_output("content", [text])]
    if completion is not None:
        outputs.append(StringCodec.encode_output("finish_reason", [completion.finish_reason]))
        for name, value in (
            ("prompt_tokens", completion.prompt_tokens),
            ("completion_tokens", completion.completion_tokens),
        ):
            outputs.append(ResponseOutput(name=name, shape=[1], datatype="INT64", data=[value]))
    return outputs
