"""The OpenAI fields beyond plain chat: structured output, tools, seed, stream options, and the
shapes of streamed answers with tool calls and usage."""

from __future__ import annotations

import json
from typing import Any

import pytest

from phi3_serving.batching import BatchOptions, batch_options_from_env
from phi3_serving.chat import (
    Completion,
    GenerationDefaults,
    InvalidRequestError,
    parse_chat_request,
    parse_tool_call,
    tool_call_schema,
)
from phi3_serving.engine import StreamEvent, with_tool_calls
from phi3_serving.openai_serving import StreamShaper, check_model, check_text_request

DEFAULTS = GenerationDefaults()
HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def test_response_format_becomes_compact_json_guidance() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = parse_chat_request(
        {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
        DEFAULTS,
    )
    guidance = request.options.guidance
    assert guidance is not None and guidance.kind == "json_schema"
    assert json.loads(guidance.grammar) == {**schema, "x-guidance": {"whitespace_flexible": False}}
    assert guidance.param == "response_format.json_schema.schema"
    assert parse_chat_request({"messages": HI, "response_format": {"type": "text"}}, DEFAULTS).options.guidance is None


def test_forced_tool_call_is_guided_and_closed() -> None:
    request = parse_chat_request({"messages": HI, "tools": [TOOL], "tool_choice": "required"}, DEFAULTS)
    assert [tool.name for tool in request.forced_tools] == ["f"]
    schema = tool_call_schema(request.forced_tools)
    assert schema["properties"]["name"] == {"const": "f"}
    assert schema["properties"]["arguments"]["additionalProperties"] is False
    # The model is told about the tools in the system message.
    assert request.messages_as_dicts()[0]["role"] == "system"
    assert '"f"' in request.messages_as_dicts()[0]["content"]


def test_tool_choice_none_hides_the_tools_and_auto_guides_nothing() -> None:
    assert parse_chat_request({"messages": HI, "tools": [TOOL], "tool_choice": "none"}, DEFAULTS).tools == ()
    auto = parse_chat_request({"messages": HI, "tools": [TOOL]}, DEFAULTS)
    assert auto.tools and not auto.forced_tools and auto.options.guidance is None


def test_answer_that_calls_a_tool_becomes_tool_calls() -> None:
    request = parse_chat_request({"messages": HI, "tools": [TOOL]}, DEFAULTS)
    completion = with_tool_calls(Completion('{"name": "f", "arguments": {"x": 1}}', "stop", 3, 9), request)
    assert completion.finish_reason == "tool_calls"
    assert completion.tool_calls[0].name == "f" and json.loads(completion.tool_calls[0].arguments) == {"x": 1}
    assert with_tool_calls(Completion("plain text", "stop", 3, 2), request).tool_calls == ()
    assert parse_tool_call('{"name": "other", "arguments": {}}', request.tools) is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"presence_penalty": 1}, "presence_penalty"),
        ({"functions": []}, "functions"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
            "response_format.json_schema.schema",
        ),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
        ({"tools": [TOOL, TOOL]}, "tools[1]"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"ignore_eos": True, "min_tokens": 3, "max_tokens": 5}, "ignore_eos"),
        (
            {"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_fields_we_cannot_honour_name_themselves(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_chat_request({"messages": HI, **fields}, DEFAULTS)
    assert raised.value.param == param


def test_ignore_eos_generates_max_tokens() -> None:
    assert parse_chat_request({"messages": HI, "max_tokens": 7, "ignore_eos": True}, DEFAULTS).options.min_tokens == 7
    assert parse_chat_request({"messages": HI, "max_tokens": 7, "ignore_eos": False}, DEFAULTS).options.min_tokens == 0


def test_harmless_fields_and_seed_are_accepted() -> None:
    request = parse_chat_request(
        {"messages": HI, "user": "u", "metadata": {"a": "b"}, "store": False, "seed": 3, "n": 1, "logprobs": False},
        DEFAULTS,
    )
    assert request.options.seed == 3


def test_unknown_model_and_legacy_endpoint_checks() -> None:
    request = parse_chat_request({"messages": HI, "model": "other"}, DEFAULTS)
    body = check_model(request, "served")
    assert body is not None and body["error"]["code"] == "model_not_found"
    assert check_model(parse_chat_request({"messages": HI, "model": "served"}, DEFAULTS), "served") is None
    with pytest.raises(InvalidRequestError, match="prompt"):
        check_text_request({"messages": HI})


def test_include_usage_moves_usage_to_a_last_chunk_without_choices() -> None:
    request = parse_chat_request({"messages": HI, "stream": True, "stream_options": {"include_usage": True}}, DEFAULTS)
    shaper = StreamShaper("chat", request, model="m")
    chunks = [
        *shaper.opening(),
        *shaper.chunks(StreamEvent("Hi")),
        *shaper.chunks(StreamEvent("", Completion("", "stop", 2, 1))),
    ]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and "usage" not in chunks[-2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 3


def test_streamed_tool_call_is_one_delta() -> None:
    request = parse_chat_request({"messages": HI, "stream": True, "tools": [TOOL]}, DEFAULTS)
    shaper = StreamShaper("chat", request, model="m")
    assert shaper.chunks(StreamEvent('{"name": "f", ')) == []  # held: it may be a tool call
    chunks = shaper.chunks(StreamEvent('"arguments": {}}', Completion("", "stop", 2, 5)))
    assert chunks[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "f"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_completion_chunks() -> None:
    request = parse_chat_request({"prompt": "Once", "stream": True}, DEFAULTS)
    shaper = StreamShaper("text", request, model="m")
    assert shaper.opening() == []
    chunk = shaper.chunks(StreamEvent("upon"))[0]
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "upon"


def test_batch_options_from_env() -> None:
    assert batch_options_from_env({}) == BatchOptions()
    env = {"PHI3_MAX_BATCH_SIZE": "16", "PHI3_BATCH_WINDOW_MS": "5", "PHI3_SOLO_PATH": "engine"}
    options = batch_options_from_env(env)
    assert options == BatchOptions(max_batch_size=16, batch_window_s=0.005, solo_path="engine")
    for bad in ({"PHI3_MAX_BATCH_SIZE": "0"}, {"PHI3_MAX_BATCH_SIZE": "x"}, {"PHI3_SOLO_PATH": "maybe"}):
        with pytest.raises(ValueError):
            batch_options_from_env(bad)


def test_request_meter_moves_a_request_from_waiting_to_running_to_finished() -> None:
    from prometheus_client import REGISTRY

    from phi3_serving.metrics import ModelMetrics, RequestMeter

    metrics = ModelMetrics("unit-meter", max_batch_size=4)

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"model": "unit-meter", **labels}) or 0.0

    meter = RequestMeter(metrics, prompt_tokens=7)
    assert (sample("phi3_requests_waiting"), sample("phi3_requests_running")) == (1, 0)
    meter.token()
    meter.token()
    assert (sample("phi3_requests_waiting"), sample("phi3_requests_running")) == (0, 1)
    meter.finish("cancelled")
    meter.finish("cancelled")  # twice is once
    assert sample("phi3_requests_running") == 0
    assert sample("phi3_requests_finished_total", finish_reason="cancelled") == 1
    assert sample("phi3_prompt_tokens_total") == 7
    assert sample("phi3_generation_tokens_total") == 2
    assert sample("phi3_inter_token_latency_seconds_count") == 1
    metrics.step(2)
    assert sample("phi3_batch_occupancy_ratio") == 0.5
