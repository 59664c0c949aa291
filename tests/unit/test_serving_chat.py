"""Request parsing, response shapes and the stop-sequence filter of the data plane."""

from __future__ import annotations

from typing import Any

import pytest

from phi3_serving.chat import (
    ChatMessage,
    Completion,
    GenerationDefaults,
    InvalidRequestError,
    StopSequenceFilter,
    chat_completion,
    chat_completion_chunk,
    error_body,
    parse_chat_request,
)

DEFAULTS = GenerationDefaults(max_tokens=128, temperature=0.2, top_p=0.9)
USER_HI = [{"role": "user", "content": "hi"}]


def test_messages_request_takes_defaults_for_what_it_leaves_out() -> None:
    request = parse_chat_request({"messages": USER_HI}, DEFAULTS)
    assert request.messages == (ChatMessage("user", "hi"),)
    assert request.prompt is None
    assert (request.options.max_tokens, request.options.temperature, request.options.top_p) == (128, 0.2, 0.9)
    assert request.options.top_k is None
    assert request.options.stop == ()
    assert request.stream is False


def test_request_fields_override_defaults() -> None:
    request = parse_chat_request(
        {"messages": USER_HI, "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "stop": "\n"}, DEFAULTS
    )
    options = request.options
    assert (options.max_tokens, options.temperature, options.top_p, options.top_k) == (7, 0.0, 0.5, 3)
    assert options.stop == ("\n",)
    assert options.greedy


def test_max_completion_tokens_is_an_alias() -> None:
    assert parse_chat_request({"messages": USER_HI, "max_completion_tokens": 9}, DEFAULTS).options.max_tokens == 9


def test_prompt_request_and_one_element_prompt_list() -> None:
    assert parse_chat_request({"prompt": "Once"}, DEFAULTS).prompt == "Once"
    assert parse_chat_request({"prompt": ["Once"]}, DEFAULTS).prompt == "Once"


def test_text_content_parts_are_joined() -> None:
    request = parse_chat_request(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
        DEFAULTS,
    )
    assert request.messages == (ChatMessage("user", "ab"),)


@pytest.mark.parametrize(
    ("payload", "message", "param"),
    [
        ({"messages": []}, "must not be empty", "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'", "messages[0]"),
        ({"messages": [{"content": "x"}]}, "unknown role None", "messages[0]"),
        ({"messages": USER_HI, "max_tokens": -1}, "'max_tokens' must be at least 1", "max_tokens"),
        ({"messages": USER_HI, "max_tokens": 0}, "'max_tokens' must be at least 1", "max_tokens"),
        ({"messages": USER_HI, "max_tokens": 1.5}, "'max_tokens' must be an integer", "max_tokens"),
        ({"messages": USER_HI, "max_tokens": True}, "'max_tokens' must be an integer", "max_tokens"),
        ({"messages": USER_HI, "temperature": 3}, "'temperature' must be between 0 and 2", "temperature"),
        ({"messages": USER_HI, "temperature": "hot"}, "'temperature' must be a number", "temperature"),
        ({"messages": USER_HI, "top_p": 0}, "'top_p' must be in (0, 1]", "top_p"),
        ({"messages": USER_HI, "top_k": -2}, "'top_k' must be 0 or more", "top_k"),
        ({"messages": USER_HI, "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop sequences", "stop"),
        ({"messages": USER_HI, "stop": [""]}, "'stop' must be a non-empty string", "stop"),
        ({"messages": USER_HI, "n": 2}, "only n=1", "n"),
        ({"messages": USER_HI, "stream": "yes"}, "'stream' must be true or false", "stream"),
        ({"messages": "hi"}, "'messages' must be a list", "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "content must be a string", "messages[0]"),
        ({"messages": USER_HI, "prompt": "x"}, "either 'messages' or 'prompt'", "messages"),
        ({}, "needs 'messages'", "messages"),
        ({"prompt": ""}, "'prompt' must not be empty", "prompt"),
        ({"prompt": "\u0000"}, "must not contain NUL", "prompt"),
        ({"prompt": "a\u0000b"}, "must not contain NUL", "prompt"),
    ],
)
def test_invalid_requests_name_the_problem(payload: dict[str, Any], message: str, param: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        parse_chat_request(payload, DEFAULTS)
    assert message in raised.value.message
    assert raised.value.param == param
    assert isinstance(raised.value, ValueError)


def test_non_object_request_is_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="JSON object"):
        parse_chat_request(["messages"], DEFAULTS)


def test_defaults_from_env() -> None:
    env = {"PHI3_MAX_TOKENS": "512", "PHI3_TEMPERATURE": "0.2", "PHI3_TOP_P": "1.0", "PHI3_TOP_K": ""}
    assert GenerationDefaults.from_env(env) == GenerationDefaults(max_tokens=512, temperature=0.2, top_p=1.0)
    assert GenerationDefaults.from_env({}) == GenerationDefaults()


@pytest.mark.parametrize("env", [{"PHI3_MAX_TOKENS": "many"}, {"PHI3_MAX_TOKENS": "0"}, {"PHI3_TOP_P": "2"}])
def test_bad_defaults_fail_at_startup(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        GenerationDefaults.from_env(env)


def test_chat_completion_shape_and_usage() -> None:
    body = chat_completion(Completion("Hello", "stop", 5, 2), model="phi3", completion_id="chatcmpl-1", created=7)
    assert body == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 7,
        "model": "phi3",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def test_chunk_shapes() -> None:
    role = chat_completion_chunk(completion_id="c", created=1, model="m", role="assistant")
    assert role["choices"][0] == {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
    final = chat_completion_chunk(
        completion_id="c", created=1, model="m", finish_reason="length", usage={"total_tokens": 3}
    )
    assert final["choices"][0]["delta"] == {}
    assert final["usage"] == {"total_tokens": 3}


def test_error_body_is_openai_shaped() -> None:
    assert error_body("bad", param="max_tokens", code="x") == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "max_tokens", "code": "x"}
    }


def run_filter(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    stop_filter = StopSequenceFilter(stops)
    shown = []
    for piece in pieces:
        shown.append(stop_filter.feed(piece))
        if stop_filter.stopped:
            break
    shown.append(stop_filter.flush())
    return "".join(shown), stop_filter.stopped


@pytest.mark.parametrize(
    ("stops", "pieces", "shown", "stopped"),
    [
        ([], ["ab", "cd"], "abcd", False),
        (["END"], ["hello ", "EN", "D more"], "hello ", True),
        (["END"], ["hello E", "N", "X"], "hello ENX", False),
        (["\n\n"], ["a\n", "\nb"], "a", True),
        (["xy", "b"], ["aaxb"], "aax", True),
        (["abc"], ["ab"], "ab", False),
        (["stop"], ["stop"], "", True),
    ],
)
def test_stop_filter_across_pieces(stops: list[str], pieces: list[str], shown: str, stopped: bool) -> None:
    assert run_filter(stops, pieces) == (shown, stopped)


def test_stop_filter_holds_back_only_possible_prefixes() -> None:
    stop_filter = StopSequenceFilter(["<END>"])
    assert stop_filter.feed("abc<E") == "abc"
    assert stop_filter.feed("X") == "<EX"


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", float("inf")), ("max_tokens", float("nan")), ("top_k", float("-inf")), ("seed", float("nan")),
     ("seed", 2**63), ("seed", -(2**63) - 1)],
)
def test_numbers_no_engine_could_take_are_a_400_naming_them(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        parse_chat_request({"messages": USER_HI, field: value}, DEFAULTS)
    assert refused.value.param == field


def test_a_64_bit_seed_is_a_seed() -> None:
    for seed in (2**63 - 1, -(2**63), 2**40, 7, 3.0):
        assert parse_chat_request({"messages": USER_HI, "seed": seed}, DEFAULTS).options.seed == seed


def test_onnx_seeds_fold_into_32_bits_deterministically() -> None:
    from phi3_serving.onnx_engine import og_seed

    for seed in (0, 7, -1, 2**31 - 1, -(2**31)):
        assert og_seed(seed) == seed  # in range: unchanged, so answers seeded so far stay the same
    for seed in (2**31, 2**63 - 1, -(2**63), 2**40 + 5):
        assert 0 <= og_seed(seed) < 2**31
        assert og_seed(seed) == og_seed(seed)
    assert og_seed(2**40) != og_seed(2**40 + 1)


@pytest.mark.parametrize(
    "calls", [1, "call", {"function": {"name": "f"}}, [1], [{"function": {"name": "f", "arguments": "[" * 5000}}]]
)
def test_malformed_tool_calls_in_the_history_are_a_400(calls: Any) -> None:
    messages = [*USER_HI, {"role": "assistant", "content": "", "tool_calls": calls}]
    with pytest.raises(InvalidRequestError, match="tool_calls"):
        parse_chat_request({"messages": messages}, DEFAULTS)
