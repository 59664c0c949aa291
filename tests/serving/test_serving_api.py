"""Both flavors, served by `phi3-operator serve`, answered through every API the runtime offers."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from openai import BadRequestError, OpenAI

from tests.serving.conftest import DEFAULT_MAX_TOKENS, Served

pytestmark = pytest.mark.serving

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


def openai_client(served: Served) -> OpenAI:
    return OpenAI(base_url=f"{served.process.base_url}/v1", api_key="not-needed", max_retries=0, timeout=120)


def assert_usage_consistent(usage: Any) -> None:
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_chat_completion(served: Served) -> None:
    response = openai_client(served).chat.completions.create(model=served.name, messages=CHAT, max_tokens=16)  # type: ignore[arg-type]
    assert response.object == "chat.completion"
    assert response.model == served.name
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage is not None
    assert_usage_consistent(response.usage)
    assert response.usage.completion_tokens <= 16


def test_generation_defaults_come_from_the_environment(served: Served) -> None:
    """The operator's spec.generation.maxTokens (PHI3_MAX_TOKENS) caps a request that sets none."""
    response = openai_client(served).chat.completions.create(model=served.name, messages=CHAT, temperature=0)  # type: ignore[arg-type]
    assert response.usage is not None
    assert response.usage.completion_tokens <= DEFAULT_MAX_TOKENS
    if response.choices[0].finish_reason == "length":
        assert response.usage.completion_tokens == DEFAULT_MAX_TOKENS


def test_stop_sequence_cuts_the_answer(served: Served) -> None:
    client = openai_client(served)
    free = client.chat.completions.create(model=served.name, messages=CHAT, max_tokens=60, temperature=0)  # type: ignore[arg-type]
    text = free.choices[0].message.content or ""
    if len(text) < 4:
        pytest.fail(f"greedy answer too short to pick a stop sequence from: {text!r}")
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.chat.completions.create(model=served.name, messages=CHAT, max_tokens=60, temperature=0, stop=[stop])  # type: ignore[arg-type]
    content = cut.choices[0].message.content or ""
    assert stop not in content
    assert text.startswith(content)
    assert cut.choices[0].finish_reason == "stop"


def test_openai_streaming_arrives_token_by_token(served: Served) -> None:
    client = openai_client(served)
    # Warm the connection and the SDK's lazily built chunk types, so the timings below are the server's.
    for _ in client.chat.completions.create(model=served.name, messages=CHAT, max_tokens=2, stream=True):  # type: ignore[arg-type]
        pass
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model=served.name,
        messages=[{"role": "user", "content": "Once upon a time"}],
        max_tokens=1000,
        temperature=0,
        stream=True,
    )
    arrivals: list[tuple[float, Any]] = [(time.perf_counter(), chunk) for chunk in stream]
    finished = time.perf_counter()
    content_times = [at for at, chunk in arrivals if chunk.choices and chunk.choices[0].delta.content]
    assert len(content_times) > 1, "expected the answer in more than one chunk"
    first_content = content_times[0]
    last_content = content_times[-1]
    # Token streaming, not one buffered answer: the first token arrived while most of the
    # generation was still ahead, and the answer came in pieces spread over time.
    timings = (
        f"first token at {first_content - started:.4f}s, last at {last_content - started:.4f}s, "
        f"done at {finished - started:.4f}s, {len(content_times)} content chunks"
    )
    assert first_content - started < 0.5 * (finished - started), timings
    assert last_content > first_content, timings
    final = arrivals[-1][1]
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.usage is not None
    assert final.usage.completion_tokens >= len(content_times)
    assert "".join(chunk.choices[0].delta.content or "" for _, chunk in arrivals if chunk.choices)


def test_v1_models_lists_the_served_model(served: Served) -> None:
    models = openai_client(served).models.list()
    assert [model.id for model in models.data] == [served.name]


def test_v2_infer_with_messages_and_prompt(served: Served) -> None:
    path = f"/v2/models/{served.name}/infer"
    messages_request = {
        "inputs": [
            {"name": "messages", "shape": [len(CHAT)], "datatype": "BYTES", "data": [json.dumps(m) for m in CHAT]}
        ],
        "parameters": {"max_tokens": 8},
    }
    status, body = served.process.post(path, messages_request)
    assert status == 200, body
    outputs = {output["name"]: output["data"] for output in body["outputs"]}
    assert isinstance(outputs["content"][0], str)
    assert outputs["finish_reason"][0] in ("stop", "length")
    assert 0 < outputs["completion_tokens"][0] <= 8

    prompt_request = {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["Once upon"]}]}
    status, body = served.process.post(path, prompt_request)
    assert status == 200, body
    outputs = {output["name"]: output["data"] for output in body["outputs"]}
    assert outputs["prompt_tokens"][0] > 0


def test_v2_infer_stream_yields_several_events(served: Served) -> None:
    request = urllib.request.Request(
        f"{served.process.base_url}/v2/models/{served.name}/infer_stream",
        data=json.dumps(
            {
                "inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["Once upon a time"]}],
                "parameters": {"max_tokens": 40, "temperature": 0},
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [
            json.loads(line[len(b"data: ") :]) for line in response.read().splitlines() if line.startswith(b"data: ")
        ]
    assert len(events) > 2
    last = {output["name"]: output["data"] for output in events[-1]["outputs"]}
    assert last["finish_reason"][0] in ("stop", "length")


def test_mlflow_invocations(served: Served) -> None:
    status, body = served.process.post("/invocations", {"prompt": "Once upon a time", "max_tokens": 6})
    assert status == 200, body
    assert isinstance(body, list) and body[0]["object"] == "chat.completion"
    assert body[0]["usage"]["completion_tokens"] <= 6

    status, body = served.process.post("/invocations", {"messages": CHAT, "max_tokens": 6})
    assert status == 200, body
    assert body[0]["choices"][0]["message"]["role"] == "assistant"


def test_mlflow_invocations_dataframe_records(served: Served) -> None:
    """The classic MLflow payloads go through MLflow's own parser and come back under `predictions`."""
    records = [{"messages": CHAT, "max_tokens": 4}, {"messages": CHAT[1:], "max_tokens": 4}]
    status, body = served.process.post("/invocations", {"dataframe_records": records})
    assert status == 200, body
    predictions = body["predictions"]
    assert len(predictions) == len(records)
    assert all(prediction["object"] == "chat.completion" for prediction in predictions)


# MLflow's own transformers pyfunc rejects the `inputs` form for llm/v1/chat; ours takes it.
@pytest.mark.parametrize("served", ["onnx"], indirect=True)
def test_mlflow_invocations_inputs(served: Served) -> None:
    status, body = served.process.post("/invocations", {"inputs": [{"messages": CHAT, "max_tokens": 3}]})
    assert status == 200, body
    assert body["predictions"][0]["usage"]["completion_tokens"] <= 3


BAD_REQUESTS = {
    "malformed-json": (b'{"messages": [', "not valid JSON"),
    "empty-messages": (json.dumps({"messages": []}).encode(), "must not be empty"),
    "unknown-role": (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "unknown role"),
    "negative-max-tokens": (
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}).encode(),
        "max_tokens",
    ),
    "prompt-longer-than-context": (
        json.dumps({"messages": [{"role": "user", "content": "The quick brown fox. " * 800}]}).encode(),
        "context",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(served: Served, case: str) -> None:
    raw, expected = BAD_REQUESTS[case]
    for path in ("/v1/chat/completions", "/invocations"):
        status, body = served.process.post(path, None, raw=raw)
        assert 400 <= status < 500, (path, status, body)
        assert expected in body["error"]["message"], body
        assert body["error"]["type"] == "invalid_request_error"
    # The same request through the OpenAI SDK becomes its BadRequestError with our message.
    if case != "malformed-json":
        with pytest.raises(BadRequestError, match=expected):
            openai_client(served).chat.completions.create(model=served.name, **json.loads(raw))
    # Streaming requests are validated before the stream starts, so they get a 4xx too.
    if case != "malformed-json":
        status, body = served.process.post("/v1/chat/completions", {**json.loads(raw), "stream": True})
        assert 400 <= status < 500, body
    status, body = served.process.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4})
    assert status == 200, body


def test_v2_bad_request_is_a_4xx(served: Served) -> None:
    status, body = served.process.post(
        f"/v2/models/{served.name}/infer",
        {"inputs": [{"name": "messages", "shape": [1], "datatype": "BYTES", "data": ["[]"]}]},
    )
    assert status == 400
    assert "must not be empty" in body["error"]


def test_eight_concurrent_requests_all_succeed(served: Served) -> None:
    client = openai_client(served)

    def ask(index: int) -> Any:
        return client.chat.completions.create(
            model=served.name,
            messages=[{"role": "user", "content": f"Count to {index}."}],
            max_tokens=32,
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(ask, range(8)))
    assert len(responses) == 8
    for response in responses:
        assert response.choices[0].message.role == "assistant"
        assert response.usage is not None and response.usage.completion_tokens > 0


def test_health_and_metrics(served: Served) -> None:
    assert served.process.get("/v2/health/live")[0] == 200
    assert served.process.get("/v2/health/ready")[0] == 200
    assert served.process.get(f"/v2/models/{served.name}/ready")[0] == 200
    status, metrics = served.process.get("/metrics", port=served.process.metrics_port)
    assert status == 200
    assert b"rest_server_requests" in metrics or b"model_infer_request" in metrics
