"""Models users log with MLflow's own APIs, not our packager, serve from pods on the real node.

The recipe's PythonModel (prompt in, text out), a ChatModel and a ResponsesAgent (both with
predict_stream, logged as models-from-code) and a tabular PythonModel each get a Phi3Model; the openai
SDK and MLflow's `/invocations` talk to them through their Services. A model whose `load_context`
raises gets `ModelLoadFailed` with its error, and nothing that serves stops.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from openai import BadRequestError, OpenAI
from tests.support.realnode import RealPath, diagnose, ready_model, service_base_url, serving_pods
from tests.support.user_models import BROKEN_LOAD_ERROR, RECIPE_PROMPT, log_user_models
from tests.support.wait import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SERVED = ("recipe", "chat", "agent", "tabular")


def _name(kind: str) -> str:
    return f"user-{kind}"


def _invocations(base: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(f"{base}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _problem(real_path: RealPath, name: str) -> dict[str, Any] | None:
    obj = real_path.cluster.get("phi3", name, real_path.namespace)
    available = next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Available"), {})
    return available if available.get("reason") == "ModelLoadFailed" else None


def test_models_logged_with_mlflow_apis_serve_from_real_pods(
    real_path: RealPath, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    uris = log_user_models(real_path.mlflow.tracking_uri, real_path.onnx_dir / "cpu-int4",
                           tmp_path_factory.mktemp("user-models-real"))
    for kind in (*SERVED, "broken"):
        cluster.apply(real_path.manifest(_name(kind), uris[kind]), namespace)
    try:
        for kind in SERVED:
            wait_until(lambda kind=kind: ready_model(cluster, _name(kind), namespace), timeout=420, interval=2,
                       message=f"{_name(kind)} to be Ready on the real node")
        broken = wait_until(lambda: _problem(real_path, _name("broken")), timeout=300, interval=2,
                            message="user-broken to report ModelLoadFailed")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(cluster, namespace, real_path.operator)}") from None
    assert BROKEN_LOAD_ERROR in broken["message"], broken

    base = {kind: service_base_url(cluster, _name(kind), namespace) for kind in SERVED}
    clients = {kind: OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
               for kind, url in base.items()}

    # The recipe's PythonModel: completions (and its own /invocations input) from the same answer.
    reference = _invocations(base["recipe"], {"inputs": {"prompt": RECIPE_PROMPT}})["predictions"]
    completion = clients["recipe"].completions.create(model=_name("recipe"), prompt=RECIPE_PROMPT)
    assert completion.choices[0].text == reference and reference

    messages = [{"role": "user", "content": "hello from the node"}]
    answer = clients["chat"].chat.completions.create(model=_name("chat"), messages=messages)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "You said: hello from the node"
    deltas = [c.choices[0].delta.content for c in clients["chat"].chat.completions.create(
        model=_name("chat"), messages=messages, stream=True) if c.choices and c.choices[0].delta.content]  # type: ignore[arg-type]
    assert len(deltas) == 6 and "".join(deltas) == "You said: hello from the node"
    assert _invocations(base["chat"], {"messages": messages})["choices"][0]["message"]["content"] == (
        "You said: hello from the node")

    response = clients["agent"].responses.create(model=_name("agent"), input="a b c")
    assert response.output_text == "c b a"
    events = list(clients["agent"].responses.create(model=_name("agent"), input="a b c", stream=True))
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["c", " b", " a"]

    table = _invocations(base["tabular"], {"dataframe_split": {"columns": ["a", "b"], "data": [[2.0, 5.0]]}})
    assert table["predictions"] == [{"total": 7.0, "product": 10.0}]
    with pytest.raises(BadRequestError, match="not available"):
        clients["tabular"].chat.completions.create(model=_name("tabular"), messages=messages)  # type: ignore[arg-type]

    # The broken model never took traffic, and everything else still serves.
    for pod in serving_pods(cluster, _name("broken"), namespace):
        ready = [c for c in pod["status"].get("conditions", []) if c["type"] == "Ready"]
        assert all(c["status"] == "False" for c in ready), pod["status"]
    assert all(ready_model(cluster, _name(kind), namespace) for kind in SERVED)

    # A rollout to a version that cannot load stalls: the serving pod keeps answering.
    serving_before = {p["metadata"]["name"] for p in serving_pods(cluster, _name("chat"), namespace)}
    cluster.kubectl("patch", "phi3", _name("chat"), "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"model": {"uri": uris["broken"]}}}))
    stalled = wait_until(lambda: _problem(real_path, _name("chat")), timeout=300, interval=2,
                         message="the stalled rollout of user-chat to report ModelLoadFailed")
    assert BROKEN_LOAD_ERROR in stalled["message"]
    again = clients["chat"].chat.completions.create(model=_name("chat"), messages=messages)  # type: ignore[arg-type]
    assert again.choices[0].message.content == "You said: hello from the node"
    ready_pods = {p["metadata"]["name"] for p in serving_pods(cluster, _name("chat"), namespace)
                  if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))}
    assert ready_pods == serving_before
    for kind in (*SERVED, "broken"):
        cluster.kubectl("delete", "phi3", _name(kind), "-n", namespace, "--wait=false", check=False)
