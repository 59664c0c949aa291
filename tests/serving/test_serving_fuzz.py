"""Thousands of odd bodies against a real `serve`: none may answer 5xx, memory stays bounded, and a
normal chat is still answered afterwards.

The bodies follow the JSON shapes of each API (OpenAI chat, completions and responses, V2 infer,
MLflow's /invocations forms), with wrong types, huge and negative numbers, odd unicode (lone
surrogates, NUL, the chat template's own markers), deep nesting, and plain random bytes. Generated
max_tokens stay small but for a few huge ones, so the tiny model answers fast. The count of bodies
by status code is printed: run with `-s` to see it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serving.conftest import onnx_process
from tests.support.raw_http import KeptAlive, Reply, send
from tests.support.serving import ServedProcess

pytestmark = pytest.mark.serving

NAME = "tiny-fuzz"
BODY_LIMIT = 256 * 1024  # PHI3_MAX_REQUEST_BYTES for this process: the override, not the default
MB = 1_000_000
# Loaded, the process holds ~280 MB; a leak per request over thousands of bodies would show.
RSS_GROWTH_BOUND = 200 * MB
FUZZ = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

COUNTS: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module")
def fuzzed(onnx_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedProcess]:
    workdir = tmp_path_factory.mktemp("fuzz")
    env = {"PHI3_MAX_REQUEST_BYTES": str(BODY_LIMIT), "PHI3_MAX_TOKENS": "4"}
    with onnx_process(onnx_model_dir, NAME, workdir, env) as process:
        yield process


@pytest.fixture(scope="module")
def client(fuzzed: ServedProcess, rss_at_start: int) -> Iterator[KeptAlive]:
    """One kept-alive connection for all the bodies (taken after the RSS baseline)."""
    kept = KeptAlive(fuzzed.http_port, timeout=120)
    yield kept
    kept.close()


@pytest.fixture(scope="module")
def rss_at_start(fuzzed: ServedProcess) -> int:
    return int(psutil.Process(fuzzed.pid).memory_info().rss)


# -- strategies ----------------------------------------------------------------------------------

ODD_CHARACTERS = (
    st.characters()
    | st.characters(categories=["Cs"])  # lone surrogates: not encodable as UTF-8
    | st.sampled_from(['"', "\\", "[", "]", "{", "}", "\x00", "\n", "\u2028", "\ufeff", "\U0001f600", "é"])
)
ODD_TEXT = st.text(ODD_CHARACTERS, max_size=24) | st.sampled_from(["<|user|>", "<|end|>", "<|endoftext|>", ""])
NUMBERS = (
    st.integers(-(2**70), 2**70)
    | st.floats()  # NaN and ±Infinity too: Python's json writes and reads them
    | st.sampled_from([0, -1, 2**31, 2**63, -(2**63), 10**30, 1e308, -0.0, 5e-324])
)
SCALARS = st.none() | st.booleans() | NUMBERS | ODD_TEXT
ANY_JSON = st.recursive(
    SCALARS, lambda children: st.lists(children, max_size=3) | st.dictionaries(ODD_TEXT, children, max_size=3),
    max_leaves=8,
)


def mostly(shaped: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Three in four draws well shaped (odd values inside), so that many bodies reach the model."""
    return st.one_of(shaped, shaped, shaped, odd)


SMALL_TOKENS = st.integers(1, 4)
MAX_TOKENS = SMALL_TOKENS | SMALL_TOKENS | SMALL_TOKENS | st.sampled_from([0, -1, 2**31, 10**30, 1.5, "4", True, None])
TEXT_PARTS = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_text"]) | ODD_TEXT, "text": ODD_TEXT}),
    max_size=2,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"]) | ODD_TEXT,
     "content": ODD_TEXT | TEXT_PARTS | ANY_JSON},
    optional={"name": ODD_TEXT, "tool_calls": ANY_JSON, "tool_call_id": ODD_TEXT | ANY_JSON},
)
PLAIN_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]), "content": ODD_TEXT | TEXT_PARTS}
)
MESSAGES = mostly(st.lists(PLAIN_MESSAGE, min_size=1, max_size=3), st.lists(MESSAGE | ANY_JSON, max_size=3) | ANY_JSON)
TOOL = st.fixed_dictionaries(
    {"type": st.just("function") | ODD_TEXT,
     "function": st.fixed_dictionaries({"name": ODD_TEXT}, optional={"parameters": ANY_JSON, "description": ODD_TEXT})},
)
SCHEMA = st.sampled_from([
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"type": "array", "items": {"type": "string"}, "maxItems": 2},
    {"type": "string", "pattern": "[a-z]{2}"},
    {"type": "nonsense"},
    {"$ref": "#/nowhere"},
]) | ANY_JSON
RESPONSE_FORMAT = (
    st.sampled_from([{"type": "text"}, {"type": "json_object"}])
    | st.builds(lambda schema: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, SCHEMA)
    | ANY_JSON
)
OPTIONS = {
    "model": mostly(st.just(NAME), ODD_TEXT),
    "max_tokens": MAX_TOKENS,
    "max_completion_tokens": MAX_TOKENS,
    "min_tokens": MAX_TOKENS,
    "temperature": NUMBERS | ANY_JSON,
    "top_p": NUMBERS,
    "top_k": NUMBERS,
    "n": NUMBERS,
    "seed": NUMBERS | ANY_JSON,
    "stop": ODD_TEXT | st.lists(ODD_TEXT, max_size=6) | ANY_JSON,
    "stream": st.booleans() | ANY_JSON,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | ANY_JSON}) | ANY_JSON,
    "presence_penalty": NUMBERS,
    "frequency_penalty": NUMBERS,
    "logprobs": st.booleans() | ANY_JSON,
    "user": ODD_TEXT,
}
CHAT_BODIES = st.fixed_dictionaries(
    {"messages": MESSAGES},
    optional={**OPTIONS, "response_format": RESPONSE_FORMAT, "tools": st.lists(TOOL | ANY_JSON, max_size=2) | ANY_JSON,
              "tool_choice": st.sampled_from(["auto", "none", "required"]) | ANY_JSON},
)
# Every field of the right type and range, odd only in its text: these reach the model (templates,
# guidance, tool prompts, seeds, streams).
PLAUSIBLE_TOOL = st.fixed_dictionaries({
    "type": st.just("function"),
    "function": st.fixed_dictionaries(
        {"name": st.from_regex(r"[a-z_]{1,8}", fullmatch=True)},
        optional={"description": ODD_TEXT, "parameters": SCHEMA},
    ),
})
PLAUSIBLE_CHAT_BODIES = st.fixed_dictionaries(
    {"messages": st.lists(PLAIN_MESSAGE, min_size=1, max_size=3), "max_tokens": SMALL_TOKENS},
    optional={
        "model": st.just(NAME),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0.01, 1),
        "top_k": st.integers(0, 2**40),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": st.lists(st.text(ODD_CHARACTERS, min_size=1, max_size=4), max_size=4),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "response_format": RESPONSE_FORMAT,
        "tools": st.lists(PLAUSIBLE_TOOL, min_size=1, max_size=2),
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "min_tokens": st.integers(0, 2),
    },
)
COMPLETION_BODIES = st.fixed_dictionaries(
    {"prompt": mostly(st.text(ODD_CHARACTERS, min_size=1, max_size=24), st.lists(ODD_TEXT, max_size=3) | ANY_JSON)},
    optional={**OPTIONS, "echo": st.booleans() | ANY_JSON, "suffix": ODD_TEXT, "best_of": NUMBERS,
              "messages": MESSAGES},
)
RESPONSES_BODIES = st.fixed_dictionaries(
    {"input": ODD_TEXT | st.lists(MESSAGE | ANY_JSON, max_size=3) | ANY_JSON},
    optional={"model": st.just(NAME) | ODD_TEXT, "instructions": ODD_TEXT, "max_output_tokens": MAX_TOKENS,
              "stream": st.booleans() | ANY_JSON, "tools": ANY_JSON},
)
DATATYPES = st.sampled_from(["BYTES", "INT64", "INT8", "UINT8", "FP32", "FP16", "FP64", "BOOL"]) | ODD_TEXT
V2_INPUT = st.fixed_dictionaries(
    {"name": st.sampled_from(["messages", "prompt"]) | ODD_TEXT,
     "shape": st.lists(st.integers(-2, 4) | st.sampled_from([2**40, -(2**63)]), max_size=3) | ANY_JSON,
     "datatype": DATATYPES,
     "data": st.lists(SCALARS | st.just(json.dumps([{"role": "user", "content": "hi"}])), max_size=4) | ANY_JSON},
    optional={"parameters": st.fixed_dictionaries(
        {}, optional={"content_type": st.sampled_from(["str", "np", "pd", "json", "base64"]) | ODD_TEXT})},
)
PLAIN_V2_INPUT = st.fixed_dictionaries({
    "name": st.sampled_from(["messages", "prompt"]),
    "shape": st.just([1]),
    "datatype": st.just("BYTES"),
    "data": st.lists(ODD_TEXT | st.builds(json.dumps, st.lists(PLAIN_MESSAGE, max_size=2)), min_size=1,
                     max_size=1),
})
V2_BODIES = st.fixed_dictionaries(
    {"inputs": mostly(st.lists(PLAIN_V2_INPUT, min_size=1, max_size=1), st.lists(V2_INPUT, max_size=3) | ANY_JSON)},
    optional={"id": ODD_TEXT | ANY_JSON, "outputs": ANY_JSON,
              "parameters": st.fixed_dictionaries({}, optional={k: OPTIONS[k] for k in ("max_tokens", "temperature",
                                                                                         "top_p", "stop")}) | ANY_JSON},
)
ROWS = st.lists(st.fixed_dictionaries({}, optional={"prompt": ODD_TEXT | ANY_JSON, "messages": MESSAGES,
                                                    "max_tokens": MAX_TOKENS, "temperature": NUMBERS}), max_size=3)
INVOCATIONS_BODIES = st.one_of(
    st.fixed_dictionaries({"dataframe_split": st.fixed_dictionaries(
        {"columns": st.lists(st.sampled_from(["prompt", "messages", "max_tokens"]) | ODD_TEXT, max_size=3) | ANY_JSON,
         "data": st.lists(st.lists(SCALARS, max_size=3), max_size=3) | ANY_JSON},
        optional={"index": ANY_JSON})}, optional={"params": ANY_JSON}),
    st.fixed_dictionaries({"dataframe_records": ROWS | ANY_JSON}, optional={"params": ANY_JSON}),
    st.fixed_dictionaries({"inputs": ROWS | st.dictionaries(st.sampled_from(["prompt", "messages"]) | ODD_TEXT,
                                                             st.lists(SCALARS, max_size=3)) | ANY_JSON},
                          optional={"params": ANY_JSON}),
    st.fixed_dictionaries({"instances": ROWS | ANY_JSON}, optional={"params": ANY_JSON}),
    CHAT_BODIES,
    ANY_JSON,
)
V2_PATHS = st.sampled_from([f"/v2/models/{NAME}/infer", f"/v2/models/{NAME}/infer_stream",
                            f"/v2/models/{NAME}/generate", f"/v2/models/{NAME}/versions/1/infer"])
ALL_PATHS = st.sampled_from([
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/invocations", f"/v2/models/{NAME}/infer",
    f"/v2/models/{NAME}/infer_stream", "/v2/repository/index", "/v1/models", "/ping",
])
CONTENT_TYPES = st.sampled_from([
    "application/json", "text/csv", "text/plain", "application/json; charset=utf-16",
    "application/x-www-form-urlencoded",
])


def encode(value: Any, ascii_only: bool) -> bytes:
    # Lone surrogates go out as their raw (invalid UTF-8) bytes when not escaped.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def deep_bodies(draw: st.DrawFn) -> bytes:
    """Nesting near, at and far past the limit; balanced or not; inside an API's own shape or bare."""
    depth = draw(st.sampled_from([63, 64, 65, 200, 1000, 5000, 100_000]) | st.integers(1, 300))
    opener = draw(st.sampled_from([b"[", b"{\"a\":", b"[{\"b\":"]))
    closer = {b"[": b"]", b"{\"a\":": b"}", b"[{\"b\":": b"}]"}[opener]
    inner = opener * depth + b"1" + (closer * depth if draw(st.booleans()) else b"")
    shape = draw(st.sampled_from([b"%s", b'{"messages": %s}', b'{"prompt": "x", "stop": %s}',
                                  b'{"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": %s}]}',
                                  b'{"dataframe_records": %s}']))
    return shape.replace(b"%s", inner)


# -- the fuzzing ---------------------------------------------------------------------------------


def post(client: KeptAlive, family: str, path: str, body: bytes, content_type: str = "application/json") -> Reply:
    reply = client.send("POST", path, body, {"Content-Type": content_type})
    COUNTS[(family, reply.status)] += 1
    assert reply.status < 500, (path, reply.status, body[:300], reply.body[:500])
    return reply


@settings(FUZZ, max_examples=1000)
@given(body=CHAT_BODIES, ascii_only=st.booleans())
def test_chat_bodies(client: KeptAlive, body: Any, ascii_only: bool) -> None:
    post(client, "chat", "/v1/chat/completions", encode(body, ascii_only))


@settings(FUZZ, max_examples=600)
@given(body=PLAUSIBLE_CHAT_BODIES, ascii_only=st.booleans())
def test_plausible_chat_bodies(client: KeptAlive, body: Any, ascii_only: bool) -> None:
    post(client, "plausible chat", "/v1/chat/completions", encode(body, ascii_only))


@settings(FUZZ, max_examples=500)
@given(body=COMPLETION_BODIES, ascii_only=st.booleans())
def test_completion_bodies(client: KeptAlive, body: Any, ascii_only: bool) -> None:
    post(client, "completions", "/v1/completions", encode(body, ascii_only))


@settings(FUZZ, max_examples=150)
@given(body=RESPONSES_BODIES, ascii_only=st.booleans())
def test_responses_bodies(client: KeptAlive, body: Any, ascii_only: bool) -> None:
    post(client, "responses", "/v1/responses", encode(body, ascii_only))


@settings(FUZZ, max_examples=600)
@given(body=V2_BODIES, path=V2_PATHS, ascii_only=st.booleans())
def test_v2_infer_bodies(client: KeptAlive, body: Any, path: str, ascii_only: bool) -> None:
    post(client, "v2", path, encode(body, ascii_only))


@settings(FUZZ, max_examples=600)
@given(body=INVOCATIONS_BODIES, ascii_only=st.booleans())
def test_invocations_bodies(client: KeptAlive, body: Any, ascii_only: bool) -> None:
    post(client, "invocations", "/invocations", encode(body, ascii_only))


@settings(FUZZ, max_examples=150)
@given(body=deep_bodies(), path=ALL_PATHS)
def test_deeply_nested_bodies(client: KeptAlive, body: bytes, path: str) -> None:
    post(client, "deep", path, body)


@settings(FUZZ, max_examples=400)
@given(body=st.binary(max_size=2048), path=ALL_PATHS, content_type=CONTENT_TYPES)
def test_random_bytes(client: KeptAlive, body: bytes, path: str, content_type: str) -> None:
    post(client, "bytes", path, body, content_type)


def _v2_prompt(**extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["Hi"]}], **extra}


# What the fuzzing found answering 500 (or a 200 cut short), each now a 4xx.
FOUND = {
    "V2 messages of null": (f"/v2/models/{NAME}/infer",
                            {"inputs": [{"name": "messages", "shape": [], "datatype": "BYTES", "data": None}]}),
    "V2 prompt of no data": (f"/v2/models/{NAME}/infer",
                             {"inputs": [{"name": "prompt", "shape": [0], "datatype": "BYTES", "data": []}]}),
    "V2 id not ASCII (sent back in Ce-Id)": (f"/v2/models/{NAME}/infer", _v2_prompt(id="\u0100")),
    "V2 id with a line break": (f"/v2/models/{NAME}/infer", _v2_prompt(id="a\r\nX-Injected: 1")),
    "top_k past the vocabulary": ("/v1/completions", {"prompt": "0", "top_k": 321, "max_tokens": 2}),
    "top_k past 32 bits": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_k": 2**40,
                                                    "max_tokens": 2}),
    "seed past 32 bits": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**31,
                                                   "max_tokens": 2}),
    "seed past 64 bits": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}),
    "max_tokens of Infinity": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": float("inf")}),
    "top_k of 1 with a temperature": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                               "top_k": 1, "temperature": 0.5, "max_tokens": 2}),
    "dataframe_split with list column labels": ("/invocations", {"dataframe_split": {
        "columns": [None, None, []], "data": [[None, None, None]]}, "params": []}),
    "a lone surrogate in the model name": ("/v1/completions", {"prompt": "0", "model": "\ud800"}),
    "a lone surrogate in the prompt": ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}),
    "a lone surrogate in a message": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udc00"}]}),
    "a lone surrogate in /invocations": ("/invocations", {"inputs": {"prompt": "\ud800"}}),
    "tool_calls not a list": ("/v1/chat/completions",
                              {"messages": [{"role": "assistant", "content": "", "tool_calls": 1}]}),
    "tool call arguments nested 100,000 deep": ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "[" * 100_000}}]},
    ]}),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_what_the_fuzzing_found_stays_fixed(fuzzed: ServedProcess, case: str) -> None:
    path, body = FOUND[case]
    reply = send(fuzzed.http_port, "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    assert 200 <= reply.status < 500, (reply.status, reply.body[:300])
    if case.startswith(("top_k", "seed past 32")):
        assert reply.status == 200, reply.body[:300]  # folded into what the engine takes
    else:
        assert reply.status == 400, reply.body[:300]


def test_paired_surrogate_escapes_are_text(fuzzed: ServedProcess) -> None:
    body = json.dumps({"prompt": "a\U0001f600b", "max_tokens": 2}).encode()  # ensure_ascii: \ud83d\ude00
    assert b"\\ud83d\\ude00" in body
    reply = send(fuzzed.http_port, "POST", "/v1/completions", body, {"Content-Type": "application/json"})
    assert reply.status == 200, reply.body[:300]


def test_a_v2_stream_refused_after_its_200_says_why_in_band(fuzzed: ServedProcess) -> None:
    # MLServer's infer_stream sends its 200 before the model sees the request: no 4xx is possible.
    reply = send(fuzzed.http_port, "POST", f"/v2/models/{NAME}/infer_stream", json.dumps({"inputs": []}).encode(),
                 {"Content-Type": "application/json"})
    assert reply.status == 200
    events = [json.loads(line[len(b"data: "):]) for line in reply.body.splitlines() if line.startswith(b"data: ")]
    assert len(events) == 1 and events[0]["outputs"] == []
    assert events[0]["parameters"]["status_code"] == 400
    assert "messages" in events[0]["parameters"]["error"]


def test_bytes_that_are_not_utf8_are_a_400(fuzzed: ServedProcess) -> None:
    for path in (f"/v2/models/{NAME}/infer", "/v1/chat/completions", "/invocations"):
        reply = send(fuzzed.http_port, "POST", path, b"\x80", {"Content-Type": "application/json"})
        assert reply.status == 400, (path, reply.body[:300])


def test_the_body_limit_override_holds(fuzzed: ServedProcess) -> None:
    body = b'{"messages": []}' + b" " * BODY_LIMIT
    reply = send(fuzzed.http_port, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert reply.status == 413
    assert f"request bodies up to {BODY_LIMIT} bytes" in fuzzed.log_path.read_text(errors="replace")


def test_afterwards_the_server_is_well(fuzzed: ServedProcess, rss_at_start: int) -> None:
    assert fuzzed.running
    rss_now = int(psutil.Process(fuzzed.pid).memory_info().rss)
    by_status: Counter[int] = Counter()
    for (_, status), count in COUNTS.items():
        by_status[status] += count
    families = sorted({family for family, _ in COUNTS})
    print(f"\nfuzz: {sum(COUNTS.values())} bodies; by status {dict(sorted(by_status.items()))}")
    for family in families:
        print(f"  {family}: {dict(sorted((s, n) for (f, s), n in COUNTS.items() if f == family))}")
    print(f"server RSS at start {rss_at_start / MB:.1f} MB, after {rss_now / MB:.1f} MB")
    assert not any(status >= 500 for status in by_status)
    assert rss_now - rss_at_start < RSS_GROWTH_BOUND
    hello = {"model": NAME, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    status, answer = fuzzed.post("/v1/chat/completions", hello)
    assert status == 200, answer
    assert answer["choices"][0]["message"]["role"] == "assistant"
