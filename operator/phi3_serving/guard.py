"""Who may call the served model, and how much one request may ask: the guard in front of the HTTP port.

One ASGI middleware wraps MLServer's whole REST app (`serve` installs it), so MLServer's V2 routes
get the same treatment as our OpenAI and MLflow handlers. It checks, cheapest first:

1. the API key (`Authorization: Bearer`), on every path but health and readiness → 401;
2. a declared Content-Length over the body limit → 413, before any of the body is read;
3. the queue: model requests beyond what the model runs plus a bounded queue → 429 + Retry-After;
4. the body as it streams in, counted against the same limit (chunked bodies too) → 413;
5. the body itself: inflated within the limit if gzipped (413), UTF-8 (400), and how deeply
   it nests, scanned without parsing (400).

Only then does the request reach MLServer. Responses pass through untouched, so streams still
flow chunk by chunk. The top of this module needs no server (limits, the body checks, path
classes, key files), so the operator and the unit tests can use it as it is.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phi3_serving.chat import error_body

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

ENV_MAX_REQUEST_BYTES = "PHI3_MAX_REQUEST_BYTES"
ENV_MAX_QUEUED_REQUESTS = "PHI3_MAX_QUEUED_REQUESTS"
ENV_API_KEYS_DIR = "PHI3_API_KEYS_DIR"

MIB = 1 << 20
# A context's worth of prompt is at most a few bytes per token as plain text (~4 for English),
# but JSON escapes non-ASCII text as \uXXXX (6 bytes a character, 12 for a surrogate pair, and a
# CJK character is often a token of its own) and chat framing adds keys and quotes per message.
# 32 bytes a token leaves room for a whole context of the worst of that; a body larger than it
# cannot fit the context anyway, and would only be refused after seconds of tokenizing it.
BYTES_PER_CONTEXT_TOKEN = 32
# Small contexts still take a batch of full prompts through /invocations, and a 4k-token model then
# gets a 1 MiB limit, which json.loads reads in milliseconds.
MIN_REQUEST_BYTES = 1 * MIB
# A pyfunc with no known context is usually tabular, and its batches (dataframe_split of many rows)
# are legitimately large: 16 MiB holds some 100,000 rows of ten numbers.
GENERIC_MAX_REQUEST_BYTES = 16 * MIB
# JSON nests a few levels in every API we serve (V2 tensors of rank ≤ 8, chat messages with tool
# schemas); 64 leaves room for deep JSON schemas in response_format while staying far below the
# ~1000 frames at which Python's json (and pydantic) hit RecursionError and answered 500.
MAX_JSON_DEPTH = 64
# Waiting requests allowed per request the model runs at once: a request that finds the queue this
# full waits about four whole generations before it starts, so past that a client does better
# retrying (on another replica, behind the Service) than waiting here.
QUEUED_PER_RUNNING = 4
# The autoscaler scales on phi3_requests_waiting: with a batch of 1 or 2 a queue of 4-8 would
# turn bursts into 429s before the waiting gauge ever showed the load.
MIN_QUEUED_REQUESTS = 32
# The OpenAI SDK waits as long as Retry-After says when it is at most 60 s.
MAX_RETRY_AFTER_S = 60
# How often the key directory is looked at again: Kubernetes swaps a Secret volume's `..data`
# symlink atomically, and a listdir plus a few stats on it take microseconds.
KEYS_RECHECK_S = 1.0
# A client that sent an honest but too large body is still sending when the 413 goes out, and reads
# it only once its send returns: keep reading (and dropping) its body for a while, or closing the
# socket on unread data would reset the connection and lose the 413. Bounded, so an endless
# upload cannot hold the connection.
DRAIN_BYTES = 64 * MIB
DRAIN_TIMEOUT_S = 10.0
# An EWMA of model request durations, for Retry-After: recent requests say most about the next.
_DURATION_WEIGHT = 0.2

# A child of MLServer's logger, so these lines come out in its format and level.
logger = logging.getLogger("mlserver.guard")


# ---------------------------------------------------------------------------------------------
# Limits


def default_max_request_bytes(context_tokens: int | None) -> int:
    """The body limit when PHI3_MAX_REQUEST_BYTES does not set one: from the context, when known."""
    if not context_tokens:
        return GENERIC_MAX_REQUEST_BYTES
    return max(MIN_REQUEST_BYTES, BYTES_PER_CONTEXT_TOKEN * context_tokens)


def default_max_queued_requests(running: int) -> int:
    return max(MIN_QUEUED_REQUESTS, QUEUED_PER_RUNNING * running)


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {raw!r}")
    return value


@dataclass(frozen=True)
class GuardSettings:
    """What the environment says; None where the model decides."""

    max_request_bytes: int | None = None
    max_queued_requests: int | None = None
    api_keys_dir: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GuardSettings:
        """Raises ValueError naming the variable when a value is not usable."""
        keys_dir = env.get(ENV_API_KEYS_DIR, "").strip()
        return cls(
            max_request_bytes=_env_int(env, ENV_MAX_REQUEST_BYTES, 1),
            max_queued_requests=_env_int(env, ENV_MAX_QUEUED_REQUESTS, 0),
            api_keys_dir=Path(keys_dir) if keys_dir else None,
        )


def max_request_bytes(env: Mapping[str, str], context_tokens: int | None) -> int:
    """The body limit a runtime with this environment serving this model enforces."""
    override = GuardSettings.from_env(env).max_request_bytes
    return override if override is not None else default_max_request_bytes(context_tokens)


@dataclass(frozen=True)
class ModelLimits:
    max_request_bytes: int
    running: int | None = None  # requests the model computes at once; None until a model has loaded
    max_queued: int = 0

    @property
    def max_in_flight(self) -> int | None:
        """Model requests admitted at once (running and waiting); None: no bound."""
        return None if self.running is None else self.running + self.max_queued


def model_limits(settings: GuardSettings, *, context_tokens: int | None, running: int | None) -> ModelLimits:
    body = settings.max_request_bytes
    if running is None:
        return ModelLimits(max_request_bytes=body or GENERIC_MAX_REQUEST_BYTES)
    queued = settings.max_queued_requests
    return ModelLimits(
        max_request_bytes=body or default_max_request_bytes(context_tokens),
        running=running,
        max_queued=default_max_queued_requests(running) if queued is None else queued,
    )


def retry_after_seconds(mean_request_s: float | None, running: int) -> int:
    """About when a slot frees up: with `running` requests computing, one ends every mean/running s."""
    if not mean_request_s or running < 1:
        return 1
    return min(MAX_RETRY_AFTER_S, max(1, math.ceil(mean_request_s / running)))


# ---------------------------------------------------------------------------------------------
# JSON nesting, without parsing

# Scanned in windows, so that the scan's arrays stay small whatever the body's size.
_SCAN_WINDOW = 1 << 18
_QUOTE = ord('"')


@functools.cache
def _bracket_steps() -> Any:
    """Per byte value: +1 for an opening bracket, -1 for a closing one."""
    import numpy as np

    steps = np.zeros(256, dtype=np.int8)
    steps[[ord("["), ord("{")]] = 1
    steps[[ord("]"), ord("}")]] = -1
    return steps


def json_depth(data: bytes) -> int:
    """How deep a JSON parser would recurse into `data`: arrays and objects opened outside strings.

    Vectorised, because a Python loop over a megabyte of brackets costs more than parsing it.
    Escaped backslashes, then escaped quotes, are dropped first (left to right, as JSON pairs
    them), so every quote left opens or closes a string. On invalid JSON (a stray closer, a
    backslash outside a string) the count may go wrong only past the point where a parser has
    already failed, and never below the depth the parser reached.
    """
    import numpy as np

    text = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    table = _bracket_steps()
    deepest = depth = 0
    in_string = False
    for start in range(0, len(text), _SCAN_WINDOW):
        window = np.frombuffer(text, dtype=np.uint8, count=min(_SCAN_WINDOW, len(text) - start), offset=start)
        steps = table[window]
        # True from an opening quote up to its closing one: the brackets there are text.
        inside = np.logical_xor.accumulate(window == _QUOTE)
        if in_string:
            np.logical_not(inside, out=inside)
        steps[inside] = 0
        levels = np.cumsum(steps, dtype=np.int32)
        levels += depth
        deepest = max(deepest, int(levels.max()))
        depth = int(levels[-1])
        in_string = bool(inside[-1])
    return deepest


def gunzip_within(data: bytes, limit: int) -> bytes | None:
    """`data` gunzipped (every member, as gzip.decompress does), or None once it passes `limit`
    bytes: a gzip bomb of a few hundred KB would otherwise inflate to gigabytes. Raises ValueError
    for data that is not gzip."""
    pieces: list[bytes] = []
    size = 0
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            piece = inflater.decompress(data, limit + 1 - size)
        except zlib.error as error:
            raise ValueError(str(error)) from error
        size += len(piece)
        if size > limit or inflater.unconsumed_tail:
            return None
        if not inflater.eof:
            raise ValueError("the gzip data ends early")
        pieces.append(piece)
        data = inflater.unused_data
    return b"".join(pieces)


def is_utf8(data: bytes) -> bool:
    """Checked in windows, so a large body never becomes one large str."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for start in range(0, len(data), _SCAN_WINDOW):
            decoder.decode(data[start : start + _SCAN_WINDOW])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str


def checked_body(body: bytes, *, limit: int, gzipped: bool, json_expected: bool) -> bytes | Refusal:
    """The body the app may read (inflated, if it came gzipped), or why it may not have it.

    MLServer inflates `Content-Encoding: gzip` bodies itself, without a bound, on every route: the
    guard does it instead, within the limit. JSON is UTF-8 (RFC 8259), which the depth scan relies
    on; and FastAPI's validation-error handler fails (500) echoing a body that is not UTF-8.
    """
    if gzipped:
        try:
            inflated = gunzip_within(body, limit)
        except ValueError as error:
            return Refusal(400, "invalid_gzip", f"the request body is not valid gzip: {error}")
        if inflated is None:
            message = f"the request body is larger than this model's limit of {limit} bytes once inflated"
            return Refusal(413, "request_too_large", f"{message} ({ENV_MAX_REQUEST_BYTES})")
        body = inflated
    if not json_expected:
        return body
    if not is_utf8(body):
        return Refusal(400, "invalid_encoding", "the request body is not UTF-8: JSON must be")
    if json_depth(body) > MAX_JSON_DEPTH:
        return Refusal(400, "too_deeply_nested", f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    return body


def _is_csv(headers: Mapping[bytes, bytes]) -> bool:
    return headers.get(b"content-type", b"").split(b";")[0].strip().lower() == b"text/csv"


# ---------------------------------------------------------------------------------------------
# Paths


class Route(Enum):
    OPEN = "open"  # health and readiness: the kubelet's probes carry no key
    MODEL = "model"  # runs the model: needs a key, and a place in the queue
    OTHER = "other"  # metadata, docs, the repository API, unknown paths: needs a key


_SERVER_READY = "/v2/health/ready"
_OPEN_PATHS = frozenset({"/v2/health/live", _SERVER_READY, "/ping"})
_MODEL_READY = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/ready")
_MODEL_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/invocations"})
_V2_INFER = re.compile(r"/v2/models/[^/]+(?:/versions/[^/]+)?/(?:infer|generate)(?:_stream)?")


def classify(method: str, path: str) -> Route:
    """Open is a short list of exact health paths; everything else needs a key, so a route MLServer
    or we add later is closed until someone opens it. MLServer's docs (`/v2/docs`, a model's
    `/docs`) stay closed: they describe the model to whoever may call it."""
    if path in _OPEN_PATHS or _MODEL_READY.fullmatch(path):
        return Route.OPEN
    if method == "POST" and (path in _MODEL_PATHS or _V2_INFER.fullmatch(path)):
        return Route.MODEL
    return Route.OTHER


def needs_api_key(path: str) -> bool:
    return classify("GET", path) is not Route.OPEN


# ---------------------------------------------------------------------------------------------
# API keys


@dataclass(frozen=True)
class KeySet:
    """The keys of a key directory, kept as SHA-256 digests: equal lengths to compare, and no key
    text kept in memory beyond the read. `problem` says (naming the directory, never a key) why
    no request can pass."""

    digests: tuple[bytes, ...] = ()
    problem: str | None = None


def read_api_keys(directory: Path) -> KeySet:
    """One key per regular file whose name does not start with "." (a Secret volume's `..data` and
    `..<timestamp>` entries); surrounding whitespace stripped, empty files ignored."""
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
    except OSError as error:
        return KeySet(problem=f"cannot read the API key directory {directory}: {error.strerror}")
    digests: list[bytes] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if not entry.is_file():  # follows the per-key symlinks into ..data
                continue
            key = Path(entry.path).read_bytes().strip()
        except OSError:  # removed while we read: the next look sees the directory changed
            continue
        if key:
            digests.append(hashlib.sha256(key).digest())
    problem = None if digests else f"the API key directory {directory} holds no key"
    return KeySet(tuple(digests), problem)


def key_dir_fingerprint(directory: Path) -> tuple[Any, ...]:
    """What changes when the keys may have: the directory's own stat (entries added, removed, the
    `..data` symlink swapped), where `..data` points, and each key file's identity and mtime."""
    try:
        own = os.stat(directory)
        try:
            data_link: str | None = os.readlink(directory / "..data")
        except OSError:
            data_link = None
        files: list[tuple[str, int | None, int | None, int | None]] = []
        for entry in os.scandir(directory):
            if entry.name.startswith("."):
                continue
            try:
                stat = entry.stat()  # follows symlinks
                files.append((entry.name, stat.st_ino, stat.st_mtime_ns, stat.st_size))
            except OSError:
                files.append((entry.name, None, None, None))
    except OSError as error:
        return ("unreadable", error.errno)
    return (own.st_ino, own.st_mtime_ns, data_link, tuple(sorted(files, key=lambda item: item[0])))


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                return None
            return token.strip() or None
    return None


def key_matches(token: bytes | None, keys: KeySet) -> bool:
    """Constant time in which key matched: every digest is compared, none short-circuits."""
    presented = hashlib.sha256(token or b"").digest()
    matched = False
    for digest in keys.digests:
        matched |= hmac.compare_digest(presented, digest)
    return matched and token is not None


class ApiKeys:
    """The valid keys of a key directory, looked at again at most every KEYS_RECHECK_S."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self._clock = clock
        self._checked_at = -math.inf
        self._fingerprint: tuple[Any, ...] | None = None
        self._keys = KeySet()
        self._reported: str | None = None

    def current(self) -> KeySet:
        now = self._clock()
        if now - self._checked_at >= KEYS_RECHECK_S:
            self._checked_at = now
            # The fingerprint is taken before the read: a change during the read shows next time.
            fingerprint = key_dir_fingerprint(self.directory)
            if fingerprint != self._fingerprint:
                self._fingerprint = fingerprint
                self._keys = read_api_keys(self.directory)
                self._report(self._keys)
        return self._keys

    def _report(self, keys: KeySet) -> None:
        """A line when the state changes (never per request); a count, never a key."""
        if keys.problem is not None:
            if keys.problem != self._reported:
                logger.error("%s: every request to the model is refused (401) until it holds one", keys.problem)
            self._reported = keys.problem
            return
        logger.info("API keys: %d key(s) in %s", len(keys.digests), self.directory)
        self._reported = None


# ---------------------------------------------------------------------------------------------
# The process's guard: settings, keys, the queue, and the limits of the model it serves


@dataclass
class _Queue:
    in_flight: int = 0
    mean_s: float | None = None

    def leave(self, seconds: float | None) -> None:
        """`seconds`: how long the model had it; None for a request refused before it got there."""
        self.in_flight -= 1
        if seconds is not None:
            self.mean_s = seconds if self.mean_s is None else self.mean_s + _DURATION_WEIGHT * (seconds - self.mean_s)


@dataclass
class Guard:
    """Mutable only from the event loop, where every request passes it."""

    settings: GuardSettings = field(default_factory=GuardSettings)
    limits: ModelLimits = field(init=False)
    keys: ApiKeys | None = field(init=False)
    queue: _Queue = field(default_factory=_Queue)
    # MLServer's own `/v2/health/ready` is "every registered model is ready", which is true with
    # none registered: while the model still loads, and after its load failed. Ready waits for it.
    model_ready: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.limits = model_limits(self.settings, context_tokens=None, running=None)
        self.keys = ApiKeys(self.settings.api_keys_dir) if self.settings.api_keys_dir else None

    def model_loaded(self, name: str, *, context_tokens: int | None, running: int) -> ModelLimits:
        """`serve` runs one model per process: its limits become the guard's."""
        self.limits = model_limits(self.settings, context_tokens=context_tokens, running=running)
        keys = f"required ({self.keys.directory})" if self.keys is not None else "not required"
        logger.info(
            "%s: request bodies up to %d bytes, JSON nested up to %d; %d running + %d queued, then 429; API keys %s",
            name, self.limits.max_request_bytes, MAX_JSON_DEPTH, running, self.limits.max_queued, keys,
        )
        if self.keys is not None:
            self.keys.current()  # says now, not at the first request, whether the keys are usable
        self.model_ready = True
        return self.limits


_guards: list[Guard] = []  # the one `serve` installed; empty where the runtime runs without it


def activate(guard: Guard) -> Guard:
    _guards[:] = [guard]
    return guard


def report_model(name: str, *, context_tokens: int | None, running: int) -> None:
    """The runtime calls this once its model has loaded; a no-op without a guard (the benchmark)."""
    for guard in _guards:
        guard.model_loaded(name, context_tokens=context_tokens, running=running)


# ---------------------------------------------------------------------------------------------
# The ASGI middleware


class _ClientGone(Exception):
    pass


@dataclass(frozen=True)
class _TooLarge:
    body_ended: bool  # the chunk that passed the limit was the last: nothing is left to drop


class GuardMiddleware:
    """Plain ASGI, not Starlette's BaseHTTPMiddleware: the response's messages go straight to the
    server, so streams are never buffered, and a stream holds its place in the queue until its
    body ends or its client goes away (that is when the app returns)."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan; there are no WebSocket routes
            await self.app(scope, receive, send)
            return
        guard = self.guard
        if scope["path"] == _SERVER_READY and not guard.model_ready:
            await _send_json(send, 503, error_body("the model has not loaded", code="model_not_ready"))
            return
        route = classify(scope["method"], scope["path"])
        raw_headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        if guard.keys is not None:
            if route is not Route.OPEN and not key_matches(bearer_token(raw_headers), guard.keys.current()):
                message = "Incorrect or missing API key: send 'Authorization: Bearer <key>'"
                await _send_json(
                    send, 401, error_body(message, code="invalid_api_key"), [(b"www-authenticate", b"Bearer")]
                )
                return
            # Checked, the key goes no further: MLServer copies every request header into V2 payloads
            # (`parameters.headers`), where a model, a log line or an error message could show it.
            raw_headers = [(name, value) for name, value in raw_headers if name != b"authorization"]
            scope = {**scope, "headers": raw_headers}
        headers = dict(raw_headers)
        limits = guard.limits
        limit = limits.max_request_bytes
        declared = _content_length(headers)
        if declared is not None and declared > limit:
            expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
            await _refuse_too_large(send, receive, limit, drain=not expects_continue)
            return
        queue = guard.queue
        counted = route is Route.MODEL
        if counted:
            bound = limits.max_in_flight
            if bound is not None and queue.in_flight >= bound:
                await _refuse_busy(send, queue, bound, limits.running or 1)
                return
            queue.in_flight += 1
        reached_model: float | None = None
        try:
            try:
                body = await _read_body(receive, limit)
            except _ClientGone:
                return
            if isinstance(body, _TooLarge):
                if counted:  # its place in the queue is free while the rest of its body is dropped
                    counted = False
                    queue.leave(None)
                await _refuse_too_large(send, receive, limit, drain=not body.body_ended)
                return
            gzipped = _GZIP in raw_headers
            # Only MLflow's CSV is parsed by something else than a JSON parser (pandas).
            json_expected = not (scope["path"] == "/invocations" and _is_csv(headers))
            checked = checked_body(body, limit=limit, gzipped=gzipped, json_expected=json_expected)
            if isinstance(checked, Refusal):
                await _send_json(send, checked.status, error_body(checked.message, code=checked.code))
                return
            if gzipped:
                scope = _inflated_scope(scope, raw_headers, len(checked))
            reached_model = time.monotonic()
            await self.app(scope, _replay(checked, receive), send)
        finally:
            if counted:
                queue.leave(None if reached_model is None else time.monotonic() - reached_model)


# Exactly what MLServer's Request inflates (`"gzip" in headers.getlist("Content-Encoding")`).
_GZIP = (b"content-encoding", b"gzip")


def _inflated_scope(scope: Scope, headers: list[tuple[bytes, bytes]], length: int) -> Scope:
    """The request as the app gets it once the guard has inflated its body."""
    kept = [(name, value) for name, value in headers if name != b"content-length" and (name, value) != _GZIP]
    return {**scope, "headers": [*kept, (b"content-length", str(length).encode())]}


def _content_length(headers: Mapping[bytes, bytes]) -> int | None:
    raw = headers.get(b"content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:  # h11 refuses these before the app sees them
        return None


async def _read_body(receive: Receive, limit: int) -> bytes | _TooLarge:
    """The whole body, or _TooLarge as soon as it passes `limit` (what came so far is dropped)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _TooLarge(body_ended=not message.get("more_body", False))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, then the server's own messages (a disconnect, for a stream)."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


async def _send_json(
    send: Send, status: int, payload: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None,
    *, more_body: bool = False,
) -> None:
    body = json.dumps(payload).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *(headers or []),
        ],
    })
    await send({"type": "http.response.body", "body": body, "more_body": more_body})


async def _refuse_busy(send: Send, queue: _Queue, bound: int, running: int) -> None:
    retry_after = retry_after_seconds(queue.mean_s, running)
    message = (
        f"the model is busy: {queue.in_flight} requests are running or queued, at most {bound} "
        f"({ENV_MAX_QUEUED_REQUESTS}); retry in {retry_after} s"
    )
    await _send_json(
        send, 429, error_body(message, error_type="requests", code="rate_limit_exceeded"),
        [(b"retry-after", str(retry_after).encode())],
    )


async def _refuse_too_large(send: Send, receive: Receive, limit: int, *, drain: bool) -> None:
    """413 at once; then the rest of the body is read and dropped (bounded) and the connection closed."""
    message = f"the request body is larger than this model's limit of {limit} bytes ({ENV_MAX_REQUEST_BYTES})"
    await _send_json(
        send, 413, error_body(message, code="request_too_large"), [(b"connection", b"close")], more_body=drain
    )
    if not drain:
        return

    async def discard() -> None:
        dropped = 0
        while dropped <= DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            dropped += len(message.get("body", b""))

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(discard(), DRAIN_TIMEOUT_S)
    await send({"type": "http.response.body", "body": b"", "more_body": False})

