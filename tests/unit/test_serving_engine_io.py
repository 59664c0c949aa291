"""How pyfunc inputs become requests, and the shape of a streamed answer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phi3_serving.chat import Completion, InvalidRequestError
from phi3_serving.engine import (
    StreamEvent,
    max_concurrency_from_env,
    requests_from_model_input,
    stream_chunks,
)

CHAT = [{"role": "user", "content": "hi"}]


def test_one_dict_is_one_request_and_params_fill_gaps() -> None:
    assert requests_from_model_input({"messages": CHAT, "max_tokens": 3}, {"max_tokens": 9, "temperature": 0}) == [
        {"messages": CHAT, "max_tokens": 3, "temperature": 0}
    ]


def test_a_bare_string_is_a_prompt() -> None:
    assert requests_from_model_input("Once", None) == [{"prompt": "Once"}]


def test_a_list_of_dicts() -> None:
    assert requests_from_model_input([{"prompt": "a"}, {"prompt": "b"}], None) == [{"prompt": "a"}, {"prompt": "b"}]


def test_mlflow_columnar_input_becomes_rows() -> None:
    columns = {"prompt": ["a", "b"], "max_tokens": [1, 2]}
    assert requests_from_model_input(columns, None) == [
        {"prompt": "a", "max_tokens": 1},
        {"prompt": "b", "max_tokens": 2},
    ]


def test_mlflow_numpy_columns_become_rows() -> None:
    columns = {"prompt": np.array(["a", "b"]), "max_tokens": np.array([1, 2])}
    assert requests_from_model_input(columns, None) == [
        {"prompt": "a", "max_tokens": 1},
        {"prompt": "b", "max_tokens": 2},
    ]


def test_mlflow_inputs_rows_of_numpy_values_become_plain() -> None:
    rows = [{"messages": np.array(CHAT, dtype=object), "max_tokens": np.array(3), "prompt": None}]
    assert requests_from_model_input(rows, None) == [{"messages": CHAT, "max_tokens": 3}]


def test_a_single_chat_request_is_not_mistaken_for_columns() -> None:
    assert requests_from_model_input({"messages": CHAT}, None) == [{"messages": CHAT}]


def test_dataframe_rows_drop_missing_values() -> None:
    frame = pd.DataFrame([{"prompt": "a", "max_tokens": 2.0}, {"prompt": "b"}])
    rows = requests_from_model_input(frame, None)
    assert rows[0] == {"prompt": "a", "max_tokens": 2.0}
    assert rows[1] == {"prompt": "b"}


def test_unsupported_input_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequestError, match="unsupported model input"):
        requests_from_model_input(42, None)


def test_stream_chunks_role_content_then_usage() -> None:
    events = iter([StreamEvent("Hel"), StreamEvent("lo"), StreamEvent("", Completion("", "stop", 4, 2))])
    chunks = list(stream_chunks(events, model="m", completion_id="c", created=1))
    assert [chunk["choices"][0]["delta"] for chunk in chunks] == [
        {"role": "assistant"},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert {chunk["id"] for chunk in chunks} == {"c"}


@pytest.mark.parametrize(("env", "expected"), [({}, 4), ({"PHI3_MAX_CONCURRENCY": "8"}, 8)])
def test_max_concurrency_from_env(env: dict[str, str], expected: int) -> None:
    assert max_concurrency_from_env(env) == expected


@pytest.mark.parametrize("raw", ["0", "-1", "lots"])
def test_bad_max_concurrency(raw: str) -> None:
    with pytest.raises(ValueError, match="PHI3_MAX_CONCURRENCY"):
        max_concurrency_from_env({"PHI3_MAX_CONCURRENCY": raw})
