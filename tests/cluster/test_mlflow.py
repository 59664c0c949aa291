"""MLflow integration: the operator against a real `mlflow server` (sqlite, local artifacts, 127.0.0.1)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.support.cluster import Cluster
from tests.support.mlflow_server import MlflowServer
from tests.support.operator import OperatorProcess
from tests.support.serving import package
from tests.support.tiny_model import build_tiny_model
from tests.support.wait import wait_until

pytestmark = pytest.mark.cluster

REFRESH_S = 3.0  # the session operator's model refresh interval (tests/cluster/conftest.py)


@dataclass(frozen=True)
class Registry:
    server: MlflowServer
    onnx_uri: str
    transformers_uri: str

    @property
    def tracking_uri(self) -> str:
        return self.server.tracking_uri


def log_echo_versions(tracking_uri: str, count: int) -> None:
    import mlflow
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):  # type: ignore[misc]
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return model_input

    mlflow.set_tracking_uri(tracking_uri)
    for _ in range(count):
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"],
                                    registered_model_name="echo")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow-operator")) as server:
        log_echo_versions(server.tracking_uri, 2)
        from mlflow import MlflowClient

        MlflowClient(server.tracking_uri).set_registered_model_alias("echo", "champion", "1")
        tiny = build_tiny_model(tmp_path_factory.mktemp("tiny"))
        onnx_uri = package("onnx", tiny.onnx_dir, name="tiny-onnx", tracking_uri=server.tracking_uri, alias="champion")
        hf_uri = package("transformers", tiny.hf_dir, name="tiny-hf", tracking_uri=server.tracking_uri,
                         alias="champion")
        yield Registry(server=server, onnx_uri=onnx_uri, transformers_uri=hf_uri)


def model_cr(name: str, uri: str, tracking_uri: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "phi3.ai/v1alpha1",
        "kind": "Phi3Model",
        "metadata": {"name": name},
        "spec": {"model": {"uri": uri, "trackingUri": tracking_uri}, "hardware": {"target": "cpu"}, **spec},
    }


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


def wait_condition(cluster: Cluster, namespace: str, name: str, type_: str, status: str, reason: str | None = None,
                   timeout: float = 60) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = cluster.get("phi3", name, namespace)
        cond = conditions(obj).get(type_, {})
        fresh = obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]
        ok = fresh and cond.get("status") == status and (reason is None or cond.get("reason") == reason)
        return obj if ok else None

    result: dict[str, Any] = wait_until(check, timeout=timeout, message=f"{name}: {type_}={status} ({reason})")
    return result


def fetch_uri(cluster: Cluster, namespace: str, name: str) -> str:
    deployment = cluster.get("deployment", name, namespace)
    command: list[str] = deployment["spec"]["template"]["spec"]["initContainers"][0]["command"]
    return command[command.index("--model-uri") + 1]


def test_both_flavors_resolve_to_immutable_versions(
    cluster: Cluster, operator: OperatorProcess, namespace: str, registry: Registry
) -> None:
    for name, uri, flavor in (("onnx", "models:/tiny-onnx@champion", "onnx-genai"),
                              ("hf", "models:/tiny-hf@champion", "transformers")):
        cluster.apply(model_cr(name, uri, registry.tracking_uri), namespace)
        obj = wait_condition(cluster, namespace, name, "Ready", "True")
        model = obj["status"]["model"]
        expected_uri = registry.onnx_uri if flavor == "onnx-genai" else registry.transformers_uri
        assert model["resolvedUri"] == expected_uri
        assert model["name"] == expected_uri.split("/")[1]
        assert model["version"] == expected_uri.split("/")[2]
        assert len(model["runId"]) == 32
        assert model["flavor"] == flavor
        assert model["task"] == "llm/v1/chat"
        assert fetch_uri(cluster, namespace, name) == expected_uri, "the pod gets the immutable URI"
        table = cluster.kubectl("get", "phi3", name, "-n", namespace).stdout.splitlines()[1].split()
        assert table[2:4] == [model["name"], model["version"]]
    onnx = cluster.get("phi3", "onnx", namespace)["status"]["model"]
    assert onnx["variants"] == ["cpu-fp32", "cpu-int4"] or sorted(onnx["variants"]) == ["cpu-fp32", "cpu-int4"]
    runtime = cluster.get("deployment", "onnx", namespace)["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "PHI3_ONNX_VARIANT", "value": "cpu-int4"} in runtime["env"]


def test_moving_an_alias_rolls_the_deployment(
    cluster: Cluster, operator: OperatorProcess, namespace: str, registry: Registry
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(registry.tracking_uri)
    client.set_registered_model_alias("echo", "mover", "1")
    cluster.apply(model_cr("echo", "models:/echo@mover", registry.tracking_uri), namespace)
    wait_condition(cluster, namespace, "echo", "Ready", "True")
    assert fetch_uri(cluster, namespace, "echo") == "models:/echo/1"

    client.set_registered_model_alias("echo", "mover", "2")
    # Two refresh intervals, plus the scheduling slack of a loaded 2-core machine.
    wait_until(lambda: fetch_uri(cluster, namespace, "echo") == "models:/echo/2", timeout=2 * REFRESH_S + 20,
               message="the Deployment to roll to models:/echo/2")
    obj = wait_condition(cluster, namespace, "echo", "Ready", "True")
    assert obj["status"]["model"]["version"] == "2"
    events = cluster.get("events", namespace=namespace)["items"]
    moved = [e for e in events if e["reason"] == "ModelVersionChanged"]
    assert moved and "models:/echo/1" in moved[0]["message"] and "models:/echo/2" in moved[0]["message"]


@pytest.mark.parametrize("uri", ["models:/no-such-model@champion", "models:/echo/99", "models:/echo@no-such-alias"])
def test_missing_model_is_model_not_found(
    cluster: Cluster, operator: OperatorProcess, namespace: str, registry: Registry, uri: str
) -> None:
    cluster.apply(model_cr("missing", uri, registry.tracking_uri), namespace)
    obj = wait_condition(cluster, namespace, "missing", "ModelResolved", "False", "ModelNotFound")
    assert obj["status"]["phase"] == "Failed"
    ready = conditions(obj)["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "ModelNotFound"
    assert ready["message"], "the message says what is missing"
    assert not cluster.exists("deployment", "missing", namespace)


def test_mlflow_outage_keeps_serving_and_recovers(
    cluster: Cluster, operator: OperatorProcess, namespace: str, registry: Registry
) -> None:
    cluster.apply(model_cr("echo", "models:/echo@champion", registry.tracking_uri), namespace)
    wait_condition(cluster, namespace, "echo", "Ready", "True")
    before = cluster.get("deployment", "echo", namespace)

    registry.server.stop()
    try:
        obj = wait_condition(cluster, namespace, "echo", "ModelResolved", "False", "MLflowUnavailable")
        assert "still serving models:/echo/1" in conditions(obj)["ModelResolved"]["message"]
        assert conditions(obj)["Ready"]["reason"] == "MLflowUnavailable"
        after = cluster.get("deployment", "echo", namespace)
        # What serves is untouched; the Deployment controller's own status writes may still move resourceVersion.
        assert after["metadata"]["generation"] == before["metadata"]["generation"]
        assert after["spec"] == before["spec"]
        assert operator.alive()
    finally:
        registry.server.start()
    # Recovery is the operator resolving again (within a refresh interval once MLflow answers). Ready also
    # needs the kwok node's pods to stay ready, which a loaded 2-core machine does not always give.
    wait_condition(cluster, namespace, "echo", "ModelResolved", "True", "Resolved", timeout=120)
    assert fetch_uri(cluster, namespace, "echo") == "models:/echo/1"


def test_credentials_never_appear_in_logs_events_or_status(
    cluster: Cluster, operator: OperatorProcess, namespace: str, registry: Registry
) -> None:
    token, key = f"tok-{secrets.token_hex(12)}", f"key-{secrets.token_hex(12)}"
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mlflow-creds"},
                   "stringData": {"MLFLOW_TRACKING_TOKEN": token, "AWS_SECRET_ACCESS_KEY": key}}, namespace)
    cluster.apply(model_cr("secret", "models:/echo@champion", registry.tracking_uri,
                           ) | {"spec": {"model": {"uri": "models:/echo@champion", "trackingUri": registry.tracking_uri,
                                                   "credentialsSecretRef": {"name": "mlflow-creds"}},
                                         "hardware": {"target": "cpu"}}}, namespace)
    obj = wait_condition(cluster, namespace, "secret", "Ready", "True")
    deployment = cluster.get("deployment", "secret", namespace)
    runtime = deployment["spec"]["template"]["spec"]["containers"][0]
    assert runtime["envFrom"] == [{"secretRef": {"name": "mlflow-creds"}}]

    events = cluster.get("events", namespace=namespace)
    for text in (operator.log(), json.dumps(events), json.dumps(obj), json.dumps(deployment)):
        assert token not in text and key not in text


def test_unreadable_model_is_invalid_model(
    cluster: Cluster, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    cluster.apply(model_cr("nomodel", tmp_path.as_uri(), "http://127.0.0.1:9"), namespace)
    obj = wait_condition(cluster, namespace, "nomodel", "ModelResolved", "False", "InvalidModel")
    assert "MLmodel" in conditions(obj)["ModelResolved"]["message"] or "cannot read" in conditions(obj)[
        "ModelResolved"]["message"]
