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
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

from mlserver import MLModel
from mlserver.codecs import StringCodec
from mlserver.errors import MLServerError
from mlserver.handlers import custom_handler
from mlserver.logging import logger
from mlserver.types import InferenceRequest, InferenceResponse, Parameters, RequestInput, ResponseOutput
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
from phi3_serving.guard import MAX_JSON_DEPTH, json_depth, report_model
from phi3_serving.loading import ServedModel, load_served_model
from phi3_serving.metrics import ModelMetrics, RequestMeter
from phi3_serving.openai_serving import (
    Endpoint,
    StreamShaper,
    check_model,
    check_model_name,
    check_text_request,
    response_body,
)
from phi3_serving.pyfunc_model import (
    OPENAI_ENDPOINTS,
    ResponsesStreamShaper,
    response_object,
    responses_agent_input,
    unsupported_endpoint_message,
)

# The V2 request parameters we read as generation options.
_V2_OPTION_KEYS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop")
_LLM_INPUT_KEYS = ("messages", "prompt")


# Models that failed to load in this process (MLServer itself only logs it).
LOAD_FAILURES: list[str] = []

_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Response]])
_Result = TypeVar("_Result")


def _route(path: str, method: str = "POST") -> Callable[[_Handler], _Handler]:
    """MLServer's `custom_handler`, typed: MLServer mounts the method on its FastAPI app at `path`."""
    return cast(Callable[[_Handler], _Handler], custom_handler(rest_path=path, rest_method=method))


class _Streams(Protocol):
    """What `_ThreadedStream` drives: a ChatEngine, or a ResponsesAgent's stream."""

    def stream(self, request: Any) -> Iterator[StreamEvent]: ...


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

    def __init__(self, engine: _Streams, request: ChatRequest | None, pool: ThreadPoolExecutor) -> None:
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


@dataclass(frozen=True)
class _AgentEvent(StreamEvent):
    agent_event: dict[str, Any] = field(default_factory=dict)


class _AgentStream:
    """A ResponsesAgent's predict_stream in the shape `_ThreadedStream` drives (an engine's `stream`)."""

    def __init__(self, pyfunc_model: Any, agent_request: dict[str, Any]) -> None:
        self._model = pyfunc_model
        self._request = agent_request

    def stream(self, _request: object) -> Iterator[StreamEvent]:
        events = self._model.predict_stream(self._request)
        return (_AgentEvent("", None, dict(event) if isinstance(event, dict) else {}) for event in events)


class Phi3Runtime(MLModel):  # type: ignore[misc]
    """Serves one MLflow model: ours (either engine) or any pyfunc a user logged with MLflow's APIs."""

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
            last_line = (str(error).strip().splitlines() or [""])[-1]
            LOAD_FAILURES.append(f"{self.name}: {type(error).__name__}: {last_line}")
            raise
        self._engine: ChatEngine | None = self._served.engine
        self._metrics = ModelMetrics(self.name)
        describe = getattr(self._engine, "describe", None)
        if describe is not None:
            logger.info("%s: %s", self.name, describe())
        elif self._served.shape is not None:
            shape = self._served.shape
            logger.info("%s: MLflow pyfunc, %s-shaped (%s)", self.name, shape.shape, shape.why)
        self._pool = ThreadPoolExecutor(
            max_workers=self._served.max_concurrency, thread_name_prefix=f"phi3-{self.name}"
        )
        self._created = int(time.time())
        report_model(
            self.name, context_tokens=self._served.context_tokens, running=self._served.running_capacity
        )
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

    def _chat_engine(self) -> ChatEngine:
        if self._engine is None:
            raise InvalidRequestError(self._no_engine_message())
        return self._engine

    def _no_engine_message(self) -> str:
        shape = self._served.shape
        why = f" ({shape.why})" if shape is not None else ""
        return f"'{self.name}' is not a chat or prompt model{why}: send its inputs to /invocations or V2"

    async def _complete(self, request: ChatRequest) -> Completion:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._chat_engine().complete, request)

    async def _start_stream(self, request: ChatRequest) -> _ThreadedStream:
        stream = _ThreadedStream(self._chat_engine(), request, self._pool)
        await stream.started()
        return stream

    async def _in_pool(self, call: Callable[[], _Result]) -> _Result:
        """A call of the user's own pyfunc: bounded like generation, counted in the same metrics."""
        meter = RequestMeter(self._metrics, 0)

        def run() -> _Result:
            try:
                result = call()
                meter.token()
                return result
            finally:
                meter.finish("stop")

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    # -- V2 (Open Inference Protocol) ----------------------------------------------------------

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        _check_v2_id(payload)
        if self._engine is None:
            return await self._v2_pyfunc(payload)
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
        try:
            stream = await self._start_stream(self._v2_request(payload))
        except (InvalidRequestError, MLServerError) as error:
            # MLServer's infer_stream endpoint sends its 200 before it asks for the first event, so a
            # raise here would cut the response off; the stream says it in-band instead, in one event.
            message, status = (error.message, 400) if isinstance(error, InvalidRequestError) else (
                str(error), error.status_code
            )
            yield InferenceResponse(
                model_name=self.name, model_version=self.version, outputs=[],
                parameters=Parameters(error=message, status_code=status),
            )
            return
        async for batch in stream.batches():
            for event in batch:
                yield InferenceResponse(
                    model_name=self.name,
                    model_version=self.version,
                    outputs=_v2_outputs(event.text, event.completion),
                )

    async def _v2_pyfunc(self, payload: InferenceRequest) -> InferenceResponse:
        """V2 for a pyfunc without a chat engine: the inputs as a DataFrame, as MLServer's MLflow runtime does."""
        from mlflow.exceptions import MlflowException
        from mlserver.codecs import PandasCodec

        pyfunc_model = self._served.pyfunc
        frame = PandasCodec.decode_request(payload)
        try:
            result = await self._in_pool(lambda: pyfunc_model.predict(frame))
        except MlflowException as error:
            raise MLServerError(error.message.split("\n")[0], status_code=400) from error
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=_v2_pyfunc_outputs(result))

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
            return parse_chat_request(raw, self._chat_engine().defaults)
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

    @_route("/v1/responses")
    async def openai_responses(self, request: Request) -> Response:
        """OpenAI's Responses API, for an MLflow ResponsesAgent (streams from its predict_stream)."""
        body, problem = await self._openai_preflight(request, "responses")
        if problem is not None:
            return problem
        try:
            agent_request = responses_agent_input(body)
        except InvalidRequestError as error:
            return _invalid(error)
        pyfunc_model = self._served.pyfunc
        response_id = f"resp_{uuid.uuid4().hex}"
        if body.get("stream") is True and self._served.shape is not None and self._served.shape.streamable:
            shaper = ResponsesStreamShaper(response_id=response_id, model=self.name)
            stream = _ThreadedStream(_AgentStream(pyfunc_model, agent_request), None, self._pool)
            try:
                await stream.started()
            except Exception as error:  # the agent's own failure, before any byte is sent
                return _agent_failed(error)
            return StreamingResponse(
                self._responses_sse(stream, shaper), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            answer = await self._in_pool(lambda: pyfunc_model.predict(agent_request))
        except Exception as error:  # the agent's own failure
            return _agent_failed(error)
        output = answer.get("output", []) if isinstance(answer, dict) else []
        result = response_object(output, response_id=response_id, model=self.name, created=int(time.time()))
        if body.get("stream") is True:  # an agent without predict_stream: the whole answer as one stream
            shaper = ResponsesStreamShaper(response_id=response_id, model=self.name)
            events = [*shaper.opening()]
            for item in output:
                events += shaper.events({"type": "response.output_item.done", "item": item})
            events += shaper.closing()
            return Response(b"".join(_sse_event(e) for e in events), media_type="text/event-stream")
        return JSONResponse(result)

    async def _responses_sse(self, stream: _ThreadedStream, shaper: ResponsesStreamShaper) -> AsyncIterator[bytes]:
        yield b"".join(_sse_event(event) for event in shaper.opening())
        batches = stream.batches()
        try:
            async for batch in batches:
                yield b"".join(
                    _sse_event(out)
                    for event in batch
                    if isinstance(event, _AgentEvent)
                    for out in shaper.events(event.agent_event)
                )
        except Exception as error:  # the 200 is sent: say it in-band
            yield _sse_event(shaper.error(f"the agent failed: {error}"))
            return
        finally:
            await batches.aclose()
        yield b"".join(_sse_event(event) for event in shaper.closing())

    async def _openai_preflight(self, request: Request, endpoint: str) -> tuple[Any, Response | None]:
        """The JSON body, or the error for a bad body, another model's name, or an endpoint this model lacks."""
        body, problem = await _read_json(request)
        if problem is not None:
            return None, problem
        if not isinstance(body, dict):
            return None, JSONResponse(error_body("the request body must be a JSON object"), status_code=400)
        name = body.get("model")
        missing = check_model_name(name if isinstance(name, str) else None, self.name)
        if missing is not None:
            return None, JSONResponse(missing, status_code=404)
        shape = self._served.shape
        offered = OPENAI_ENDPOINTS[shape.shape] if shape is not None else frozenset({"chat", "text"})
        if endpoint not in offered:
            message = (
                unsupported_endpoint_message(shape, endpoint, self.name)
                if shape is not None
                else f"/v1/responses is not available for '{self.name}': "
                "it serves /v1/chat/completions and /v1/completions"
            )
            return None, JSONResponse(error_body(message, code="unsupported_endpoint"), status_code=400)
        return body, None

    async def _openai(self, request: Request, endpoint: Endpoint) -> Response:
        body, problem = await self._openai_preflight(request, endpoint)
        if problem is not None:
            return problem
        try:
            if endpoint == "text":
                check_text_request(body)
            chat_request = parse_chat_request(body, self._chat_engine().defaults)
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
        except Exception as error:
            if self._served.ours:
                raise
            # A user's predict raised: say so in OpenAI's shape, with the model's own message.
            logger.exception("%s: predict failed", self.name)
            return JSONResponse(error_body(f"the model failed: {error}", error_type="server_error"), status_code=500)
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
        # A user's pyfunc answers /invocations exactly as `mlflow models serve` does, chat input included.
        if self._served.ours and isinstance(body, dict) and any(key in body for key in _LLM_INPUT_KEYS):
            try:
                chat_request = parse_chat_request(body, self._chat_engine().defaults)
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

        try:
            result = await self._in_pool(score)
        except MlflowException as error:
            cause = error.__cause__ or error.__context__
            message = cause.message if isinstance(cause, InvalidRequestError) else error.message
            return JSONResponse(error_body(message.split("\n")[0]), status_code=400)
        except Exception as error:
            # MLflow prints the input DataFrame into its message for a bad input, and pandas cannot
            # print some (list-valued column labels): the input is still at fault.
            if not isinstance(error.__context__, MlflowException):
                raise
            return JSONResponse(error_body(error.__context__.message.split("\n")[0]), status_code=400)
        return Response(content=result.response, status_code=result.status, media_type=result.mimetype)

    @_route("/ping", "GET")
    async def mlflow_ping(self, request: Request) -> Response:
        return Response(content="\n", media_type="application/json")


# ---------------------------------------------------------------------------------------------


async def _read_json(request: Request) -> tuple[Any, Response | None]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, JSONResponse(
            error_body(f"the request body is not valid JSON: {error}", code="invalid_json"), status_code=400
        )
    # The guard lets only UTF-8 through, which cannot hold a surrogate: one comes only as a \uD8xx-\uDFxx
    # escape, and a lone one is no text (the tokenizers fail on it). MLServer's orjson refuses it for V2.
    if _SURROGATE_ESCAPE.search(raw) and not _is_text(body):
        message = "the request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text"
        return None, JSONResponse(error_body(message, code="invalid_json"), status_code=400)
    return body, None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _is_text(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def _agent_failed(error: Exception) -> Response:
    logger.error("the agent failed: %s", error)
    return JSONResponse(error_body(f"the agent failed: {error}", error_type="server_error"), status_code=500)


def _invalid(error: InvalidRequestError) -> Response:
    return JSONResponse(error_body(error.message, param=error.param, code=error.code), status_code=400)


def _sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def _check_v2_id(payload: InferenceRequest) -> None:
    """MLServer sends a request's id back in a `Ce-Id` response header, which must be printable ASCII."""
    if payload.id is not None and not (payload.id.isascii() and payload.id.isprintable()):
        raise MLServerError("the request's 'id' must be printable ASCII: it is sent back in a header", status_code=400)


def _decode_v2_input(request_input: RequestInput) -> Any:
    values = [value for value in StringCodec.decode_input(request_input)]
    if not values or not all(isinstance(value, str) for value in values):
        raise MLServerError(f"input {request_input.name!r} must hold strings (datatype BYTES)", status_code=400)
    if request_input.name == "prompt":
        return values[0] if len(values) == 1 else values
    # messages: each element a JSON object, or a single element holding the whole JSON list. The
    # guard scanned the request's own nesting; JSON inside its strings is scanned here.
    if any(json_depth(value.encode()) > MAX_JSON_DEPTH for value in values):
        raise MLServerError(f"input 'messages' nests deeper than {MAX_JSON_DEPTH} levels", status_code=400)
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


def _v2_pyfunc_outputs(result: Any) -> list[ResponseOutput]:
    """A pyfunc's answer as V2 outputs: a DataFrame's columns, a dict's entries, or one `predictions` tensor."""
    import numpy as np
    from mlserver.codecs import NumpyCodec, PandasCodec

    if hasattr(result, "columns") and hasattr(result, "to_dict"):  # a DataFrame
        return list(PandasCodec.encode_response("model", result).outputs)
    named = result if isinstance(result, dict) else {"predictions": result}
    outputs = []
    for name, value in named.items():
        array = np.asarray(value.tolist() if hasattr(value, "tolist") else value)
        if array.dtype.kind in ("U", "S", "O"):
            outputs.append(StringCodec.encode_output(str(name), [str(v) for v in array.ravel().tolist()]))
        else:
            outputs.append(NumpyCodec.encode_output(str(name), array))
    return outputs
