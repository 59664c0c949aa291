"""Which OpenAI endpoints a user's pyfunc gets is read from its MLmodel metadata, and answers are read back."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from phi3_serving.chat import InvalidRequestError
from phi3_serving.pyfunc_model import completion_from_answer, model_shape, unsupported_endpoint_message


def _metadata(
    *,
    inputs: Schema | None = None,
    task: str | None = None,
    streamable: bool = False,
    params: ParamSchema | None = None,
) -> Model:
    model = Model(metadata={"task": task} if task else None)
    model.add_flavor("python_function", loader_module="mlflow.pyfunc.model", streamable=streamable)
    if inputs is not None:
        model.signature = ModelSignature(inputs=inputs, params=params)
    return model


@pytest.mark.parametrize(
    ("metadata", "shape", "why"),
    [
        (_metadata(task="llm/v1/chat"), "chat", "task llm/v1/chat"),
        (_metadata(task="agent/v1/chat"), "chat", "task agent/v1/chat"),
        (_metadata(task="agent/v1/responses"), "responses", "task agent/v1/responses"),
        (_metadata(inputs=Schema([ColSpec("string", "messages")])), "chat", "'messages'"),
        (_metadata(inputs=infer_signature({"prompt": "hi"}, "x").inputs), "prompt", "'prompt'"),
        (_metadata(inputs=Schema([ColSpec("double", "a"), ColSpec("double", "b")])), "generic", "inputs a, b"),
        (_metadata(), "generic", "no input signature"),
        (_metadata(inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "n")])), "generic", "prompt, n"),
    ],
)
def test_shape_comes_from_metadata(metadata: Model, shape: str, why: str) -> None:
    found = model_shape(metadata)
    assert found.shape == shape
    assert why in found.why


def test_streamable_and_params_are_read() -> None:
    params = ParamSchema([ParamSpec("temperature", "double", 0.5)])
    found = model_shape(
        _metadata(inputs=Schema([ColSpec("string", "messages")]), streamable=True, params=params)
    )
    assert found.streamable and found.param_names == ("temperature",)


def test_interface_wins_over_a_missing_task() -> None:
    from mlflow.pyfunc import ResponsesAgent

    class Agent(ResponsesAgent):
        def predict(self, request: Any) -> Any:
            return None

    assert model_shape(_metadata(), Agent()).shape == "responses"


def test_unsupported_endpoint_names_why_and_where_to_go() -> None:
    shape = model_shape(_metadata(inputs=Schema([ColSpec("double", "a")])))
    message = unsupported_endpoint_message(shape, "chat", "sums")
    assert message.startswith("/v1/chat/completions is not available for 'sums' (inputs a")
    assert "/invocations" in message and "/v2/models/sums/infer" in message


@pytest.mark.parametrize(
    ("answer", "text", "reason", "usage"),
    [
        ("plain text", "plain text", "stop", (0, 1)),
        (["only one"], "only one", "stop", (0, 1)),
        (pd.Series(["from a series"]), "from a series", "stop", (0, 1)),
        (pd.DataFrame({"out": ["from a frame"]}), "from a frame", "stop", (0, 1)),
        (
            {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
             "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
            "hi", "length", (3, 2),
        ),
        ([{"choices": [{"message": {"content": "in a list"}}]}], "in a list", "stop", (0, 0)),
    ],
)
def test_completion_from_answer(answer: Any, text: str, reason: str, usage: tuple[int, int]) -> None:
    completion = completion_from_answer(answer)
    assert (completion.text, completion.finish_reason) == (text, reason)
    assert (completion.prompt_tokens, completion.completion_tokens) == usage


def test_an_answer_that_is_not_text_is_an_error() -> None:
    with pytest.raises(InvalidRequestError, match="neither a chat completion nor text"):
        completion_from_answer({"total": 3})
