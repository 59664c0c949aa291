"""Models users log with MLflow's own APIs serve: each shape through the real runtime, with real clients,
and `/invocations` compared side by side with `mlflow models serve` of the same model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.serving.conftest import MAX_BATCH_SIZE
from tests.support.mlflow_server import MlflowServer
from tests.support.serving import MlflowModelsServe, ServedProcess, run_cli
from tests.support.tiny_model import TinyModel
from tests.support.user_models import BROKEN_LOAD_ERROR, RECIPE_PROMPT, log_user_models

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module")
def user_models(
    tiny_model: TinyModel, mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    return log_user_models(
        mlflow_server.tracking_uri, tiny_model.variant_dir("cpu-int4"), tmp_path_factory.mktemp("user-models")
    )


def _fetch(model_uri: str, dest: Path, tracking_uri: str) -> None:
    fetched = run_cli("fetch", "--model-uri", model_uri, "--dest", str(dest), env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert fetched.returncode == 0, fetched.stderr


class UserModel:
    def __init__(self, served: ServedProcess, reference: MlflowModelsServe) -> None:
        self.served = served
        self.reference = reference

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.served.base_url}/v1", api_key="unused", max_retries=0)


def _serve(kind: str, user_models: dict[str, str], mlflow_server: MlflowServer, workdir: Path) -> Iterator[UserModel]:
    dest = workdir / "models" / "model"
    _fetch(user_models[kind], dest, mlflow_server.tracking_uri)
    env = {"HOME": str(workdir), "TMPDIR": str(workdir), "PHI3_MAX_CONCURRENCY": str(MAX_BATCH_SIZE)}
    served = ServedProcess(str(dest), f"user-{kind}", workdir / "serve.log", env=env)
    reference = MlflowModelsServe(dest, workdir / "mlflow-serve.log")
    try:
        with served:
            yield UserModel(served, reference)
    finally:
        reference.stop()


def _user_model_fixture(kind: str) -> Any:
    @pytest.fixture(scope="module", name=kind)
    def fixture(
        user_models: dict[str, str], mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[UserModel]:
        yield from _serve(kind, user_models, mlflow_server, tmp_path_factory.mktemp(kind))

    return fixture


recipe = _user_model_fixture("recipe")
chat = _user_model_fixture("chat")
agent = _user_model_fixture("agent")
tabular = _user_model_fixture("tabular")


# -- the recipe's PythonModel: prompt in, text out ---------------------------------------------


def test_recipe_invocations_match_mlflow_models_serve(recipe: UserModel) -> None:
    for body in ({"inputs": {"prompt": RECIPE_PROMPT}}, {"dataframe_records": [{"prompt": RECIPE_PROMPT}]}):
        ours = recipe.served.post("/invocations", body)
        theirs = recipe.reference.invocations(body)
        assert ours[0] == theirs[0] == 200, (ours, theirs)
        assert ours[1] == theirs[1]
        assert isinstance(ours[1]["predictions"], str) and ours[1]["predictions"]


def test_recipe_answers_openai_completions(recipe: UserModel) -> None:
    _, reference = recipe.reference.invocations({"inputs": {"prompt": RECIPE_PROMPT}})
    completion = recipe.client.completions.create(model="user-recipe", prompt=RECIPE_PROMPT)
    assert completion.choices[0].text == reference["predictions"]
    chunks = list(recipe.client.completions.create(model="user-recipe", prompt=RECIPE_PROMPT, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == reference["predictions"]


def test_recipe_refuses_chat_naming_why(recipe: UserModel) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        recipe.client.chat.completions.create(model="user-recipe", messages=[{"role": "user", "content": "hi"}])
    message = raised.value.body["message"]  # type: ignore[index]
    assert "/v1/chat/completions is not available" in message and "'prompt'" in message


# -- a ChatModel with predict_stream --------------------------------------------------------------


def test_chat_model_answers_and_streams_over_openai(chat: UserModel) -> None:
    messages = [{"role": "user", "content": "the quick brown fox"}]
    answer = chat.client.chat.completions.create(model="user-chat", messages=messages)
    assert answer.choices[0].message.content == "You said: the quick brown fox"
    limited = chat.client.chat.completions.create(model="user-chat", messages=messages, max_tokens=3)
    assert limited.choices[0].message.content == "You said: the"  # max_tokens reached the ChatModel's params
    deltas = [
        chunk.choices[0].delta.content
        for chunk in chat.client.chat.completions.create(model="user-chat", messages=messages, stream=True)
        if chunk.choices and chunk.choices[0].delta.content
    ]
    assert len(deltas) == 6  # one chunk per word, as predict_stream yields them
    assert "".join(deltas) == "You said: the quick brown fox"


def test_chat_model_invocations_and_v2(chat: UserModel) -> None:
    body = {"messages": [{"role": "user", "content": "hello there"}]}
    ours = chat.served.post("/invocations", body)
    theirs = chat.reference.invocations(body)
    assert ours[0] == theirs[0] == 200
    assert ours[1]["choices"][0]["message"] == theirs[1]["choices"][0]["message"]
    status, v2 = chat.served.post(
        "/v2/models/user-chat/infer",
        {"inputs": [{"name": "messages", "shape": [1], "datatype": "BYTES", "data": [json.dumps(body["messages"])]}]},
    )
    assert status == 200, v2
    assert v2["outputs"][0]["data"] == ["You said: hello there"]


def test_unknown_model_name_is_404(chat: UserModel) -> None:
    with pytest.raises(openai.NotFoundError):
        chat.client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])


def test_chat_model_refuses_tools_naming_the_parameter(chat: UserModel) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as raised:
        chat.client.chat.completions.create(
            model="user-chat", messages=[{"role": "user", "content": "hi"}], tools=[tool]  # type: ignore[list-item]
        )
    assert raised.value.body["param"] == "tools"  # type: ignore[index]


def test_generic_pyfunc_metrics_count_requests(chat: UserModel) -> None:
    assert chat.served.get("/v2/models/user-chat/ready")[0] == 200  # what the pod's probes ask
    assert chat.served.get("/v2/models/no-such-model/ready")[0] != 200
    status, text = chat.served.get("/metrics", port=chat.served.metrics_port)
    assert status == 200
    lines = [line for line in text.decode().splitlines() if line.startswith("phi3_requests_finished_total")]
    counted = [float(line.rsplit(" ", 1)[1]) for line in lines if 'model="user-chat"' in line]
    assert counted and sum(counted) >= 1, lines


# -- a ResponsesAgent with predict_stream ---------------------------------------------------------


def test_responses_agent_over_openai_responses(agent: UserModel) -> None:
    response = agent.client.responses.create(model="user-agent", input="one two three")
    assert response.output_text == "three two one"
    events = list(agent.client.responses.create(model="user-agent", input="one two three", stream=True))
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas == ["three", " two", " one"]
    assert events[-1].response.output_text == "three two one"  # type: ignore[union-attr]


def test_responses_agent_refuses_chat(agent: UserModel) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        agent.client.chat.completions.create(model="user-agent", messages=[{"role": "user", "content": "hi"}])
    assert "ResponsesAgent" in raised.value.body["message"] or "agent/v1/responses" in raised.value.body["message"]  # type: ignore[index]


# -- a tabular PythonModel ------------------------------------------------------------------------


def test_tabular_invocations_match_mlflow_models_serve(tabular: UserModel) -> None:
    for body in (
        {"dataframe_split": {"columns": ["a", "b"], "data": [[1.0, 2.0], [3.0, 4.0]]}},
        {"dataframe_records": [{"a": 1.5, "b": 2.0}]},
        {"inputs": {"a": [1.0, 2.0], "b": [5.0, 6.0]}},
    ):
        ours = tabular.served.post("/invocations", body)
        theirs = tabular.reference.invocations(body)
        assert ours == theirs, body
        assert ours[0] == 200


def test_tabular_v2(tabular: UserModel) -> None:
    status, body = tabular.served.post(
        "/v2/models/user-tabular/infer",
        {"inputs": [{"name": "a", "shape": [2], "datatype": "FP64", "data": [1.0, 3.0]},
                    {"name": "b", "shape": [2], "datatype": "FP64", "data": [2.0, 4.0]}]},
    )
    assert status == 200, body
    outputs = {output["name"]: output["data"] for output in body["outputs"]}
    assert outputs == {"total": [3.0, 7.0], "product": [2.0, 12.0]}


def test_tabular_refuses_chat_naming_why(tabular: UserModel) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        tabular.client.chat.completions.create(model="user-tabular", messages=[{"role": "user", "content": "hi"}])
    body = raised.value.body
    assert body["code"] == "unsupported_endpoint"  # type: ignore[index]
    assert "inputs a, b" in body["message"] and "/invocations" in body["message"]  # type: ignore[index]


# -- a model whose own load_context raises --------------------------------------------------------


def test_broken_load_context_exits_with_its_error(
    user_models: dict[str, str], mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    dest = tmp_path / "models" / "model"
    _fetch(user_models["broken"], dest, mlflow_server.tracking_uri)
    served = ServedProcess(str(dest), "user-broken", tmp_path / "serve.log", env={"HOME": str(tmp_path)})
    with pytest.raises(AssertionError):
        served.start(timeout=120)
    assert BROKEN_LOAD_ERROR in served.log_tail(200)
