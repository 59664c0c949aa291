"""Bounded requests against a real `serve`: body size (413), JSON nesting (400) and the queue (429).

The numbers (RSS before and after, durations) are printed: run with `-s` to see them.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from phi3_serving.guard import MAX_JSON_DEPTH, default_max_request_bytes
from tests.serving.conftest import MAX_BATCH_SIZE, onnx_process
from tests.support.raw_http import Reply, declare_only, send
from tests.support.serving import ServedProcess
from tests.support.tiny_model import TinyModel
from tests.support.wait import wait_until

pytestmark = pytest.mark.serving

QUEUED = 1  # PHI3_MAX_QUEUED_REQUESTS for this process: the queue fills after MAX_BATCH_SIZE + 1
JSON = {"Content-Type": "application/json"}
CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2}
MB = 1_000_000
# Generous: a request body the server held whole would show as +60 MB, and without the guard
# a 60 MB body cost +180 MB.
RSS_GROWTH_BOUND = 100 * MB


@pytest.fixture(scope="module")
def limited(onnx_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    workdir = tmp_path_factory.mktemp("limits")
    with onnx_process(onnx_model_dir, "tiny-limits", workdir, {"PHI3_MAX_QUEUED_REQUESTS": str(QUEUED)}) as process:
        yield process


@pytest.fixture(scope="module")
def limit(tiny_model: TinyModel) -> int:
    """The default body limit the runtime derives for the tiny model's context."""
    return default_max_request_bytes(tiny_model.context_length)


def rss(process: ServedProcess) -> int:
    return int(psutil.Process(process.pid).memory_info().rss)


def chat(process: ServedProcess) -> Reply:
    return send(process.http_port, "POST", "/v1/chat/completions", json.dumps(CHAT).encode(), JSON)


def assert_openai_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body[:300])
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


class PeakRss:
    """Samples a process's RSS every 20 ms while the block runs."""

    def __init__(self, process: ServedProcess) -> None:
        self._process = psutil.Process(process.pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, int(self._process.memory_info().rss))
            self._stop.wait(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# -- body size -----------------------------------------------------------------------------------


def test_a_declared_oversize_is_refused_before_any_of_the_body_is_sent(limited: ServedProcess, limit: int) -> None:
    assert limit == 1 << 20  # max(1 MiB, 32 bytes x 1024 tokens)
    paths = ("/v1/chat/completions", f"/v2/models/{limited.model_name}/infer", "/invocations", "/v2/repository/index")
    for path in paths:
        started = time.perf_counter()
        reply = declare_only(limited.http_port, path, limit + 1)
        assert_openai_error(reply, 413, "request_too_large")
        assert time.perf_counter() - started < 5
        assert reply.headers["connection"] == "close"
    # A client that asks first (Expect: 100-continue) is told no before it sends anything.
    reply = declare_only(limited.http_port, "/v1/chat/completions", 60 * MB, {"Expect": "100-continue"})
    assert_openai_error(reply, 413, "request_too_large")


def test_a_body_at_the_limit_reaches_the_model(limited: ServedProcess, limit: int) -> None:
    body = b'{"messages": []}'
    padded = body + b" " * (limit - len(body))
    reply = send(limited.http_port, "POST", "/v1/chat/completions", padded, JSON)
    assert_openai_error(reply, 400, "invalid_request")
    assert "must not be empty" in reply.json()["error"]["message"]
    assert_openai_error(send(limited.http_port, "POST", "/v1/chat/completions", padded + b" ", JSON), 413,
                        "request_too_large")


def test_a_60_mb_body_is_refused_without_being_held(limited: ServedProcess) -> None:
    payload = json.dumps({"messages": [{"role": "user", "content": "x" * (60 * MB)}]}).encode()
    before = rss(limited)
    with PeakRss(limited) as peak:
        started = time.perf_counter()
        reply = send(limited.http_port, "POST", "/v1/chat/completions", payload, JSON)
        took = time.perf_counter() - started
    after = rss(limited)
    print(f"\n60 MB body with Content-Length: {reply.status} in {took:.2f} s; server RSS before {before / MB:.1f} MB, "
          f"peak {peak.peak / MB:.1f} MB, after {after / MB:.1f} MB")
    assert_openai_error(reply, 413, "request_too_large")
    assert peak.peak - before < RSS_GROWTH_BOUND
    assert chat(limited).status == 200


def test_a_chunked_body_is_refused_as_it_passes_the_limit(limited: ServedProcess, limit: int) -> None:
    sent = [0]

    def chunks() -> Iterator[bytes]:
        piece = b"x" * (1 << 16)
        for _ in range(60 * MB // len(piece)):
            sent[0] += len(piece)
            yield piece

    before = rss(limited)
    with PeakRss(limited) as peak:
        started = time.perf_counter()
        reply = send(limited.http_port, "POST", "/v1/chat/completions", chunks(), JSON)
        took = time.perf_counter() - started
    after = rss(limited)
    print(f"\n60 MB chunked body: {reply.status} in {took:.2f} s ({sent[0] / MB:.0f} MB sent); server RSS before "
          f"{before / MB:.1f} MB, peak {peak.peak / MB:.1f} MB, after {after / MB:.1f} MB")
    assert_openai_error(reply, 413, "request_too_large")
    assert peak.peak - before < RSS_GROWTH_BOUND

    # Refused as soon as it passes the limit: the 413 comes while the client still has most to send.
    with socket.create_connection(("127.0.0.1", limited.http_port), timeout=30) as connection:
        connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * (1 << 16)
        chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        for _ in range(limit // len(piece) + 1):
            connection.sendall(chunk)
        answer = connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_hundred_concurrent_oversized_requests(limited: ServedProcess, limit: int) -> None:
    declared = b"x" * (2 * limit)

    def oversized(index: int) -> tuple[str, int]:
        if index % 2:
            return "declared", send(limited.http_port, "POST", "/v1/chat/completions", declared, JSON).status
        chunked = iter([declared[: limit // 2]] * 4)
        return "chunked", send(limited.http_port, "POST", "/invocations", chunked, JSON).status

    before = rss(limited)
    with PeakRss(limited) as peak, ThreadPoolExecutor(max_workers=100) as pool:
        started = time.perf_counter()
        statuses = Counter(pool.map(oversized, range(100)))
        took = time.perf_counter() - started
    after = rss(limited)
    print(f"\n100 concurrent oversized requests (2 MiB each, half chunked): {dict(statuses)} in {took:.2f} s; "
          f"server RSS before {before / MB:.1f} MB, peak {peak.peak / MB:.1f} MB, after {after / MB:.1f} MB")
    assert statuses[("declared", 413)] == 50
    # A chunked body holds a place in the queue while it arrives (so at most the queue's worth of
    # bodies is ever held): those that find the queue full are told so first.
    assert statuses[("chunked", 413)] + statuses[("chunked", 429)] == 50
    assert peak.peak - before < RSS_GROWTH_BOUND
    assert chat(limited).status == 200


def test_a_gzip_bomb_is_refused_and_honest_gzip_is_served(limited: ServedProcess, limit: int) -> None:
    # MLServer inflates gzip bodies itself, without a bound: the guard inflates them, within the limit.
    bomb = gzip.compress(json.dumps({"messages": [{"role": "user", "content": " " * (200 * MB)}]}).encode())
    assert len(bomb) < limit
    before = rss(limited)
    with PeakRss(limited) as peak:
        reply = send(limited.http_port, "POST", "/v1/chat/completions", bomb, {**JSON, "Content-Encoding": "gzip"})
    print(f"\n{len(bomb) / MB:.2f} MB gzip of a 200 MB body: {reply.status}; server RSS before {before / MB:.1f} MB, "
          f"peak {peak.peak / MB:.1f} MB")
    assert_openai_error(reply, 413, "request_too_large")
    assert peak.peak - before < RSS_GROWTH_BOUND
    gzipped = {**JSON, "Content-Encoding": "gzip"}
    infer = f"/v2/models/{limited.model_name}/infer"
    for path in ("/v1/chat/completions", infer):
        reply = send(limited.http_port, "POST", path, gzip.compress(b"[" * 100_000), gzipped)
        assert_openai_error(reply, 400, "too_deeply_nested")
    reply = send(limited.http_port, "POST", "/v1/chat/completions", gzip.compress(json.dumps(CHAT).encode()), gzipped)
    assert reply.status == 200, reply.body[:300]
    v2 = {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["Hi"]}],
          "parameters": {"max_tokens": 2}}
    reply = send(limited.http_port, "POST", infer, gzip.compress(json.dumps(v2).encode()), gzipped)
    assert reply.status == 200, reply.body[:300]


def test_a_body_that_is_not_utf8_is_a_400(limited: ServedProcess) -> None:
    for path in ("/v1/chat/completions", f"/v2/models/{limited.model_name}/infer", "/invocations"):
        reply = send(limited.http_port, "POST", path, b'{"messages": "\x80"}', JSON)
        assert_openai_error(reply, 400, "invalid_encoding")


# -- nesting -------------------------------------------------------------------------------------


def test_a_body_nested_100000_deep_is_a_400(limited: ServedProcess) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    wrapped = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/invocations",
                 f"/v2/models/{limited.model_name}/infer", f"/v2/models/{limited.model_name}/infer_stream",
                 "/v2/repository/index"):
        for body in (deep, wrapped, b"[" * 100_000):
            error = assert_openai_error(send(limited.http_port, "POST", path, body, JSON), 400, "too_deeply_nested")
            assert str(MAX_JSON_DEPTH) in error["message"]
    # Whatever the declared type: the OpenAI handlers parse any body as JSON.
    reply = send(limited.http_port, "POST", "/v1/chat/completions", deep, {"Content-Type": "text/plain"})
    assert_openai_error(reply, 400, "too_deeply_nested")
    assert chat(limited).status == 200


def test_nesting_at_the_limit_is_the_models_business(limited: ServedProcess) -> None:
    nested: Any = "hi"
    for _ in range(MAX_JSON_DEPTH - 3):  # inside {"messages": [{"content": ...}]}: exactly the limit
        nested = [nested]
    body = json.dumps({"messages": [{"role": "user", "content": nested}], "max_tokens": 2}).encode()
    reply = send(limited.http_port, "POST", "/v1/chat/completions", body, JSON)
    assert reply.status == 400
    assert reply.json()["error"]["code"] != "too_deeply_nested"


def test_json_inside_a_v2_string_is_scanned_too(limited: ServedProcess) -> None:
    deep_string = "[" * 100_000 + "]" * 100_000
    body = {"inputs": [{"name": "messages", "shape": [1], "datatype": "BYTES", "data": [deep_string]}]}
    status, answer = limited.post(f"/v2/models/{limited.model_name}/infer", body)
    assert status == 400, answer
    assert "deeper than" in answer["error"]


# -- the queue -----------------------------------------------------------------------------------


def _hold(port: int) -> socket.socket:
    """A model request whose body never finishes arriving: it holds its place in the queue."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{\"messages\"")
    return connection


def test_requests_beyond_the_queue_get_429_with_retry_after(limited: ServedProcess) -> None:
    bound = MAX_BATCH_SIZE + QUEUED
    held: list[socket.socket] = []
    try:
        for _ in range(bound):
            assert chat(limited).status == 200, "refused before the queue was full"
            held.append(_hold(limited.http_port))
        # Their places are taken once the server has read their headers.
        reply = wait_until(lambda: (r := chat(limited)).status == 429 and r, timeout=10, interval=0.05,
                           message="the queue to be full")
        error = assert_openai_error(reply, 429, "rate_limit_exceeded")
        assert int(reply.headers["retry-after"]) >= 1
        assert f"at most {bound}" in error["message"]
        # What the SDK makes of it.
        client = openai.OpenAI(base_url=f"{limited.base_url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=limited.model_name, messages=CHAT["messages"], max_tokens=2)  # type: ignore[arg-type]
        # Health, readiness and metadata are never queued.
        for path in ("/v2/health/ready", "/v2/health/live", f"/v2/models/{limited.model_name}/ready", "/v1/models"):
            assert limited.get(path)[0] == 200, path
    finally:
        for connection in held:
            connection.close()
    # A client that went away frees its place.
    wait_until(lambda: chat(limited).status == 200, timeout=10, interval=0.1, message="a place in the queue")


def test_a_flood_of_streams_gets_200s_and_429s_and_nothing_else(limited: ServedProcess) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 200,
                       "stream": True}).encode()
    start = threading.Barrier(24)

    def stream(_: int) -> tuple[int, str | None, bool]:
        start.wait()
        reply = send(limited.http_port, "POST", "/v1/chat/completions", body, JSON)
        return reply.status, reply.headers.get("retry-after"), reply.body.rstrip().endswith(b"data: [DONE]")

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(stream, range(24)))
    statuses = Counter(status for status, _, _ in results)
    print(f"\n24 concurrent streams against {MAX_BATCH_SIZE} running + {QUEUED} queued: {dict(statuses)}")
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 1 and statuses[200] >= 1, statuses
    for status, retry_after, complete in results:
        if status == 429:
            assert retry_after is not None and int(retry_after) >= 1
        else:
            assert complete, "a stream that was let in ended early"
    assert chat(limited).status == 200
