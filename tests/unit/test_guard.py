"""The guard's pure parts: the JSON depth scan, the limits, the key directory and the path classes."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.support.secret_volume import write_secret_volume

from phi3_serving.guard import (
    BYTES_PER_CONTEXT_TOKEN,
    ENV_API_KEYS_DIR,
    ENV_MAX_QUEUED_REQUESTS,
    ENV_MAX_REQUEST_BYTES,
    GENERIC_MAX_REQUEST_BYTES,
    KEYS_RECHECK_S,
    MAX_RETRY_AFTER_S,
    MIB,
    MIN_QUEUED_REQUESTS,
    MIN_REQUEST_BYTES,
    ApiKeys,
    Guard,
    GuardMiddleware,
    GuardSettings,
    KeySet,
    Refusal,
    Route,
    bearer_token,
    checked_body,
    classify,
    default_max_queued_requests,
    default_max_request_bytes,
    gunzip_within,
    is_utf8,
    json_depth,
    key_dir_fingerprint,
    key_matches,
    max_request_bytes,
    model_limits,
    needs_api_key,
    read_api_keys,
    retry_after_seconds,
)

# -- JSON depth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b"", 0),
        (b"42", 0),
        (b'"a string"', 0),
        (b"{}", 1),
        (b"[1, [2, [3]]]", 3),
        (b'{"a": {"b": []}, "c": [{}]}', 3),
        (b'{"text": "[[[[{{{{"}', 1),
        (b'{"text": "he said \\"[[[\\" and left"}', 1),
        (b'{"path": "C:\\\\"}', 1),  # an escaped backslash, then the closing quote
        (b'{"a": "\\\\\\"[["}', 1),  # an escaped backslash, an escaped quote, brackets: all text
        (b'["\\\\", [["x"]]]', 3),
        (b'["\\u005b\\u005b", []]', 2),
        (b'{"unterminated": "[[[[', 1),
        (b"[" * 65, 65),
        (b"[" * 100_000 + b"]" * 100_000, 100_000),
        (b"[]" * 100_000, 1),
        (b'"' + b"[" * 100_000 + b'"', 0),
        (b'"[' * 100_000, 50_000),  # every other bracket is outside a string
        ("{\"é\": [\"ü[\", {\"日本\": []}]}".encode(), 4),
    ],
)
def test_json_depth(body: bytes, depth: int) -> None:
    assert json_depth(body) == depth


def test_json_depth_carries_strings_and_depth_across_scan_windows() -> None:
    # The scan works in 256 KiB windows: a string (full of brackets) and an open array straddle them.
    filler = "[" * 300_000
    body = json.dumps({"a": [[filler]], "b": [[[[]]]]}).encode()
    assert len(body) > 1 << 18
    assert json_depth(body) == 5
    assert json_depth(b"[" * 300_000 + b'"' + b"[" * 300_000 + b'"') == 300_000


def test_json_depth_is_never_below_what_a_parser_reaches_on_invalid_json() -> None:
    # A stray closer: a parser stops there, so what comes after cannot make it recurse.
    assert json_depth(b"[[[]]]]]]][[[[") >= 3
    assert json_depth(b"[" * 70 + b"{") == 71


def _structural_depth(value: Any) -> int:
    """The reference: how deep json.loads recurses for `value` (iterative, so any depth is fine)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


_TEXT = st.text(alphabet=st.sampled_from(list('ab"\\[]{}/\n\té日\u2028\x00')), max_size=12)
_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_JSON_VALUES, ascii_only=st.booleans())
def test_json_depth_matches_the_parsers_recursion(value: Any, ascii_only: bool) -> None:
    assert json_depth(json.dumps(value, ensure_ascii=ascii_only).encode()) == _structural_depth(value)


# -- the body itself -----------------------------------------------------------------------------


def test_gunzip_within_the_limit() -> None:
    text = b'{"messages": []}'
    assert gunzip_within(gzip.compress(text), 100) == text
    assert gunzip_within(gzip.compress(text) + gzip.compress(text), 100) == text + text  # two members
    assert gunzip_within(gzip.compress(text), len(text)) == text
    assert gunzip_within(gzip.compress(text), len(text) - 1) is None
    bomb = gzip.compress(b" " * 200_000_000)
    assert len(bomb) < 300_000
    assert gunzip_within(bomb, MIB) is None  # stops at the limit: never inflates the 200 MB
    for broken in (b"not gzip", gzip.compress(text)[:-5], gzip.compress(text) + b"junk"):
        with pytest.raises(ValueError):
            gunzip_within(broken, 100)


def test_is_utf8_across_windows() -> None:
    assert is_utf8(b"") and is_utf8("héllo 日本 \U0001f600".encode())
    assert not is_utf8(b"\x80") and not is_utf8(b"ok\xff") and not is_utf8("é".encode()[:1])
    straddling = b"a" * ((1 << 18) - 1) + "日".encode()  # a character across the window boundary
    assert is_utf8(straddling) and not is_utf8(straddling[:-1])
    assert not is_utf8("\ud800".encode("utf-8", "surrogatepass"))


def test_checked_body() -> None:
    chat = b'{"messages": [{"role": "user", "content": "hi"}]}'
    assert checked_body(chat, limit=100, gzipped=False, json_expected=True) == chat
    assert checked_body(gzip.compress(chat), limit=100, gzipped=True, json_expected=True) == chat
    refusals = {
        "bomb": checked_body(gzip.compress(b" " * 10_000), limit=100, gzipped=True, json_expected=True),
        "not gzip": checked_body(chat, limit=100, gzipped=True, json_expected=True),
        "latin-1": checked_body('{"a": "é"}'.encode("latin-1"), limit=100, gzipped=False, json_expected=True),
        "deep": checked_body(b"[" * 65 + b"]" * 65, limit=1000, gzipped=False, json_expected=True),
        "deep, gzipped": checked_body(gzip.compress(b"[" * 65), limit=1000, gzipped=True, json_expected=True),
    }
    assert {name: (r.status, r.code) for name, r in refusals.items() if isinstance(r, Refusal)} == {
        "bomb": (413, "request_too_large"),
        "not gzip": (400, "invalid_gzip"),
        "latin-1": (400, "invalid_encoding"),
        "deep": (400, "too_deeply_nested"),
        "deep, gzipped": (400, "too_deeply_nested"),
    }
    # MLflow's CSV is no JSON: neither its encoding nor its brackets are the guard's business.
    csv = "a,b\n[[[[,é\n".encode("latin-1") + b"[" * 100
    assert checked_body(csv, limit=1000, gzipped=False, json_expected=False) == csv


# -- limits --------------------------------------------------------------------------------------


def test_default_body_limit_follows_the_context() -> None:
    assert default_max_request_bytes(None) == GENERIC_MAX_REQUEST_BYTES == 16 * MIB
    assert default_max_request_bytes(1024) == MIN_REQUEST_BYTES == MIB
    assert default_max_request_bytes(4096) == MIB  # Phi-3-mini-4k
    assert default_max_request_bytes(131072) == BYTES_PER_CONTEXT_TOKEN * 131072 == 4 * MIB  # Phi-3-mini-128k


def test_body_limit_from_the_environment_wins() -> None:
    assert max_request_bytes({ENV_MAX_REQUEST_BYTES: "5000"}, 131072) == 5000
    assert max_request_bytes({ENV_MAX_REQUEST_BYTES: " "}, 131072) == 4 * MIB
    assert max_request_bytes({}, None) == GENERIC_MAX_REQUEST_BYTES


@pytest.mark.parametrize(
    ("name", "value"),
    [(ENV_MAX_REQUEST_BYTES, "0"), (ENV_MAX_REQUEST_BYTES, "1MiB"), (ENV_MAX_QUEUED_REQUESTS, "-1"),
     (ENV_MAX_QUEUED_REQUESTS, "lots")],
)
def test_bad_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        GuardSettings.from_env({name: value})


def test_settings_from_the_environment() -> None:
    assert GuardSettings.from_env({}) == GuardSettings()
    parsed = GuardSettings.from_env(
        {ENV_MAX_REQUEST_BYTES: "100", ENV_MAX_QUEUED_REQUESTS: "0", ENV_API_KEYS_DIR: "/etc/keys"}
    )
    assert parsed == GuardSettings(max_request_bytes=100, max_queued_requests=0, api_keys_dir=Path("/etc/keys"))


def test_queue_bound() -> None:
    assert default_max_queued_requests(1) == MIN_QUEUED_REQUESTS
    assert default_max_queued_requests(16) == 64
    limits = model_limits(GuardSettings(), context_tokens=4096, running=2)
    assert (limits.max_request_bytes, limits.running, limits.max_queued, limits.max_in_flight) == (MIB, 2, 32, 34)
    tight = model_limits(GuardSettings(max_queued_requests=0, max_request_bytes=10), context_tokens=None, running=3)
    assert (tight.max_request_bytes, tight.max_in_flight) == (10, 3)
    # Before a model has loaded nothing is queued for it, and the generic body limit holds.
    before = model_limits(GuardSettings(), context_tokens=None, running=None)
    assert (before.max_request_bytes, before.max_in_flight) == (GENERIC_MAX_REQUEST_BYTES, None)


def test_retry_after() -> None:
    assert retry_after_seconds(None, 4) == 1
    assert retry_after_seconds(0.05, 4) == 1
    assert retry_after_seconds(10.0, 4) == 3
    assert retry_after_seconds(10_000.0, 1) == MAX_RETRY_AFTER_S


# -- paths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        ("GET", "/v2/health/live", Route.OPEN),
        ("GET", "/v2/health/ready", Route.OPEN),
        ("GET", "/v2/models/phi3/ready", Route.OPEN),
        ("GET", "/v2/models/phi3/versions/7/ready", Route.OPEN),
        ("GET", "/ping", Route.OPEN),
        ("POST", "/v1/chat/completions", Route.MODEL),
        ("POST", "/v1/completions", Route.MODEL),
        ("POST", "/v1/responses", Route.MODEL),
        ("POST", "/invocations", Route.MODEL),
        ("POST", "/v2/models/phi3/infer", Route.MODEL),
        ("POST", "/v2/models/phi3/versions/7/infer", Route.MODEL),
        ("POST", "/v2/models/phi3/generate_stream", Route.MODEL),
        ("POST", "/v2/models/phi3/infer_stream", Route.MODEL),
        ("GET", "/v1/models", Route.OTHER),
        ("GET", "/v1/chat/completions", Route.OTHER),
        ("GET", "/v2", Route.OTHER),
        ("GET", "/v2/models/phi3", Route.OTHER),
        ("GET", "/v2/models/phi3/versions/7", Route.OTHER),
        ("GET", "/v2/docs", Route.OTHER),
        ("GET", "/v2/models/phi3/docs/dataplane.json", Route.OTHER),
        ("POST", "/v2/repository/index", Route.OTHER),
        ("POST", "/v2/repository/models/phi3/unload", Route.OTHER),
        # Near misses of the open paths stay closed.
        ("GET", "/v2/health/live/", Route.OTHER),
        ("GET", "/v2/models/phi3/ready/x", Route.OTHER),
        ("GET", "/v2/models/a/b/ready", Route.OTHER),
        ("GET", "//v2/health/ready", Route.OTHER),
        ("GET", "/pingx", Route.OTHER),
        ("GET", "/", Route.OTHER),
    ],
)
def test_path_classes(method: str, path: str, route: Route) -> None:
    assert classify(method, path) is route
    assert needs_api_key(path) == (route is not Route.OPEN)


# -- API keys ------------------------------------------------------------------------------------


def test_keys_are_the_regular_non_dot_files_stripped(tmp_path: Path) -> None:
    (tmp_path / "alice").write_text("  key-a\n")
    (tmp_path / "bob").write_text("key-b")
    (tmp_path / "empty").write_text(" \n\t")
    (tmp_path / ".hidden").write_text("key-hidden")
    (tmp_path / "subdir").mkdir()
    (tmp_path / "subdir" / "nested").write_text("key-nested")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    keys = read_api_keys(tmp_path)
    assert keys.problem is None
    assert len(keys.digests) == 2
    for good in (b"key-a", b"key-b"):
        assert key_matches(good, keys)
    for bad in (b"key-hidden", b"key-nested", b"", b" key-a", b"key-", None):
        assert not key_matches(bad, keys)


def test_a_kubernetes_secret_volume(tmp_path: Path) -> None:
    write_secret_volume(tmp_path, {"old": "key-old\n", "new": "key-new\n"})
    assert sorted(entry.name for entry in tmp_path.iterdir() if not entry.name.startswith("..")) == ["new", "old"]
    assert (tmp_path / "..data").is_symlink()
    assert os.readlink(tmp_path / "old") == "..data/old"
    keys = read_api_keys(tmp_path)
    assert len(keys.digests) == 2  # ..data and the ..<timestamp> folder are not keys
    assert key_matches(b"key-old", keys) and key_matches(b"key-new", keys)


def test_an_unusable_directory_names_itself_and_no_key(tmp_path: Path) -> None:
    missing = read_api_keys(tmp_path / "absent")
    assert missing.digests == ()
    assert missing.problem is not None and str(tmp_path / "absent") in missing.problem
    (tmp_path / "blank").write_text("\n")
    empty = read_api_keys(tmp_path)
    assert empty.problem is not None and str(tmp_path) in empty.problem
    assert not key_matches(b"", empty)


def test_rotation_is_seen_at_the_next_look(tmp_path: Path) -> None:
    now = [0.0]
    write_secret_volume(tmp_path, {"a": "key-a"})
    keys = ApiKeys(tmp_path, clock=lambda: now[0])
    assert key_matches(b"key-a", keys.current())
    before = key_dir_fingerprint(tmp_path)
    write_secret_volume(tmp_path, {"a": "key-a", "b": "key-b"})
    assert key_dir_fingerprint(tmp_path) != before
    now[0] += KEYS_RECHECK_S / 2
    assert not key_matches(b"key-b", keys.current()), "looked again sooner than KEYS_RECHECK_S"
    now[0] += KEYS_RECHECK_S
    assert key_matches(b"key-b", keys.current()) and key_matches(b"key-a", keys.current())
    write_secret_volume(tmp_path, {"b": "key-b"})
    now[0] += KEYS_RECHECK_S
    assert not key_matches(b"key-a", keys.current())
    assert key_matches(b"key-b", keys.current())


def test_a_key_file_rewritten_in_place_is_seen(tmp_path: Path) -> None:
    now = [0.0]
    (tmp_path / "k").write_text("key-1")
    keys = ApiKeys(tmp_path, clock=lambda: now[0])
    assert key_matches(b"key-1", keys.current())
    (tmp_path / "k").write_text("key-22")
    now[0] += KEYS_RECHECK_S
    assert key_matches(b"key-22", keys.current()) and not key_matches(b"key-1", keys.current())


def test_a_directory_that_appears_later_is_picked_up(tmp_path: Path) -> None:
    now = [0.0]
    keys = ApiKeys(tmp_path / "later", clock=lambda: now[0])
    assert keys.current().problem is not None
    write_secret_volume(tmp_path / "later", {"a": "key-a"})
    now[0] += KEYS_RECHECK_S
    assert key_matches(b"key-a", keys.current())


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (b"Bearer abc", b"abc"),
        (b"bearer   abc  ", b"abc"),
        (b"BEARER abc", b"abc"),
        (b"Basic abc", None),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"abc", None),
    ],
)
def test_bearer_token(value: bytes, token: bytes | None) -> None:
    assert bearer_token([(b"content-type", b"application/json"), (b"authorization", value)]) == token


def test_no_authorization_header() -> None:
    assert bearer_token([(b"content-type", b"application/json")]) is None
    assert not key_matches(None, KeySet())


# -- the middleware, on ASGI messages --------------------------------------------------------------


class _StreamingApp:
    """Reads the body, then streams two chunks with a pause between them that the test ends; or
    stops when its client disconnects, as Starlette's StreamingResponse does."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.resume = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        message = await receive()
        self.bodies.append(message["body"])
        assert message["more_body"] is False
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        resumed = asyncio.ensure_future(self.resume.wait())
        gone = asyncio.ensure_future(receive())
        done, pending = await asyncio.wait({resumed, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if gone in done:
            return
        await send({"type": "http.response.body", "body": b"second", "more_body": False})


class _Client:
    """One request through the middleware: its messages in, what the middleware sends out."""

    def __init__(self, middleware: GuardMiddleware, path: str, body: bytes = b"{}",
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.incoming.put_nowait({"type": "http.request", "body": body, "more_body": False})
        self.sent: list[dict[str, Any]] = []
        scope = {"type": "http", "method": "POST", "path": path, "headers": headers or []}
        self.task = asyncio.ensure_future(middleware(scope, self.incoming.get, self._send))

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)

    @property
    def chunks(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def _middleware(tmp_path: Path, *, keys: bool = False) -> tuple[GuardMiddleware, _StreamingApp]:
    settings = GuardSettings(max_queued_requests=0, api_keys_dir=tmp_path if keys else None)
    guard = Guard(settings)
    guard.model_loaded("m", context_tokens=None, running=1)  # one place: running 1, queue 0
    app = _StreamingApp()
    return GuardMiddleware(app, guard), app


def test_a_stream_holds_its_place_until_its_body_ends(tmp_path: Path) -> None:
    async def scenario() -> None:
        middleware, app = _middleware(tmp_path)
        first = _Client(middleware, "/v1/chat/completions")
        await _settle()
        assert first.chunks == [b"first"], "the first chunk left before the stream ended: nothing is buffered"
        assert middleware.guard.queue.in_flight == 1
        second = _Client(middleware, "/v1/chat/completions")
        await second.task
        assert second.status == 429
        health = _Client(middleware, "/v2/health/ready")  # never queued
        await _settle()
        assert health.status == 200
        app.resume.set()
        await first.task
        await health.task
        assert first.chunks == [b"first", b"second"]
        assert middleware.guard.queue.in_flight == 0
        third = _Client(middleware, "/v1/chat/completions")
        await _settle()
        assert third.status == 200
        third.task.cancel()

    asyncio.run(scenario())


def test_server_ready_waits_for_the_model_to_load() -> None:
    """MLServer's own answer is "all registered models are ready", true with none registered:
    while the model loads and after its load failed. The guard answers 503 until it has loaded."""

    async def scenario() -> None:
        app = _StreamingApp()
        middleware = GuardMiddleware(app, Guard(GuardSettings()))
        before = _Client(middleware, "/v2/health/ready")
        await before.task
        assert before.status == 503
        assert b"model_not_ready" in b"".join(before.chunks)
        assert app.scopes == [], "MLServer was not asked"
        live = _Client(middleware, "/v2/health/live")
        await _settle()
        assert live.status == 200, "liveness does not wait for the model"
        app.resume.set()
        await live.task
        middleware.guard.model_loaded("m", context_tokens=None, running=1)
        after = _Client(middleware, "/v2/health/ready")
        await after.task
        assert after.status == 200
        assert [scope["path"] for scope in app.scopes] == ["/v2/health/live", "/v2/health/ready"]

    asyncio.run(scenario())


def test_a_stream_whose_client_goes_away_frees_its_place(tmp_path: Path) -> None:
    async def scenario() -> None:
        middleware, _ = _middleware(tmp_path)
        client = _Client(middleware, "/v1/chat/completions")
        await _settle()
        assert middleware.guard.queue.in_flight == 1
        client.incoming.put_nowait({"type": "http.disconnect"})
        await client.task
        assert middleware.guard.queue.in_flight == 0

    asyncio.run(scenario())


def test_the_app_never_sees_the_key_and_gets_gzip_inflated(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("key-1")

    async def scenario() -> None:
        middleware, app = _middleware(tmp_path, keys=True)
        app.resume.set()
        body = b'{"messages": []}'
        headers = [(b"authorization", b"Bearer key-1"), (b"content-encoding", b"gzip"),
                   (b"content-length", str(len(gzip.compress(body))).encode()), (b"x-other", b"kept")]
        client = _Client(middleware, "/v1/chat/completions", gzip.compress(body), headers)
        await client.task
        assert client.status == 200
        assert app.bodies == [body]
        assert dict(app.scopes[0]["headers"]) == {b"x-other": b"kept", b"content-length": str(len(body)).encode()}
        refused = _Client(middleware, "/v1/chat/completions", body, [(b"authorization", b"Bearer key-2")])
        await refused.task
        assert refused.status == 401
        assert b"key-2" not in b"".join(refused.chunks)
        assert len(app.bodies) == 1

    asyncio.run(scenario())


# -- how `serve` puts it in place ----------------------------------------------------------------


@pytest.mark.parametrize("name", [ENV_MAX_REQUEST_BYTES, ENV_MAX_QUEUED_REQUESTS])
def test_serve_refuses_an_unusable_setting_before_it_starts(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from phi3_serving.serve import EXIT_USAGE, ServeOptions, serve

    monkeypatch.setenv(name, "-5")
    assert serve(ServeOptions(model_uri="/nowhere", model_name="m")) == EXIT_USAGE
    err = capsys.readouterr().err
    assert name in err and "Traceback" not in err


def test_the_guard_is_not_left_out_silently() -> None:
    from phi3_serving.serve import install_guard

    with pytest.raises(RuntimeError, match="unguarded"):
        install_guard(object(), Guard())
