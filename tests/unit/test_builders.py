"""Pure builders: parametrized specs in, manifest dicts out."""

from __future__ import annotations

from typing import Any

import pytest

from phi3_operator.builders import BuildContext, Owner, build_children
from phi3_operator.spec import SpecError, parse_spec

OWNER = Owner(name="phi3-mini", namespace="llm", uid="uid-1")


def context(**spec_overrides: Any) -> BuildContext:
    raw: dict[str, Any] = {"model": {"uri": "models:/phi3-mini@champion"}, "hardware": {"target": "cpu"}}
    raw.update(spec_overrides)
    return BuildContext(
        owner=OWNER,
        spec=parse_spec(raw),
        image="registry/mlserver-cpu:0.1.0",
        model_uri="models:/phi3-mini/7",
        tracking_uri="http://mlflow:5000",
        onnx_variant="cpu-int4",
    )


def kinds(ctx: BuildContext) -> list[str]:
    return [m["kind"] for m in build_children(ctx)]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, ["Deployment", "Service"]),
        ({"autoscaling": {"minReplicas": 1, "maxReplicas": 3}}, ["Deployment", "Service", "HorizontalPodAutoscaler"]),
        ({"disruptionBudget": {"minAvailable": 1}}, ["Deployment", "Service", "PodDisruptionBudget"]),
    ],
)
def test_children_follow_the_spec(overrides: dict[str, Any], expected: list[str]) -> None:
    assert kinds(context(**overrides)) == expected


def test_every_child_is_owned_and_labelled() -> None:
    for manifest in build_children(context(autoscaling={"maxReplicas": 2}, disruptionBudget={"maxUnavailable": 1})):
        meta = manifest["metadata"]
        assert meta["namespace"] == "llm"
        assert meta["ownerReferences"] == [
            {"apiVersion": "phi3.ai/v1alpha1", "kind": "Phi3Model", "name": "phi3-mini", "uid": "uid-1",
             "controller": True, "blockOwnerDeletion": True}
        ]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "phi3-operator"


def test_pod_uses_the_resolved_uri_and_runs_locked_down() -> None:
    deployment = build_children(context())[0]
    pod = deployment["spec"]["template"]["spec"]
    fetch, runtime = pod["initContainers"][0], pod["containers"][0]
    assert "models:/phi3-mini/7" in fetch["command"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["phi3.ai/model-uri"] == "models:/phi3-mini/7"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in (fetch, runtime):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {v["name"] for v in pod["volumes"]} == {"tmp", "models"}
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_replicas_left_to_the_hpa() -> None:
    assert "replicas" not in build_children(context(autoscaling={"maxReplicas": 3}))[0]["spec"]
    assert build_children(context(replicas=2))[0]["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    ("hardware", "resource", "count"),
    [
        ({"target": "cuda"}, "nvidia.com/gpu", "1"),
        ({"target": "cuda", "gpus": 2}, "nvidia.com/gpu", "2"),
        ({"target": "cuda", "gpuResourceName": "nvidia.com/mig-1g.10gb"}, "nvidia.com/mig-1g.10gb", "1"),
    ],
)
def test_cuda_requests_gpus_and_tolerates_the_taint(hardware: dict[str, Any], resource: str, count: str) -> None:
    pod = build_children(context(hardware=hardware))[0]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"][resource] == count
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_cpu_pod_has_no_gpu_and_no_toleration() -> None:
    pod = build_children(context())[0]["spec"]["template"]["spec"]
    assert "tolerations" not in pod
    assert all("nvidia" not in key for key in pod["containers"][0]["resources"].get("limits", {}))


def test_credentials_secret_becomes_env_from_of_both_containers() -> None:
    ctx = context(model={"uri": "models:/m/1", "credentialsSecretRef": {"name": "mlflow-creds"}})
    pod = build_children(ctx)[0]["spec"]["template"]["spec"]
    for container in (pod["initContainers"][0], pod["containers"][0]):
        assert container["envFrom"] == [{"secretRef": {"name": "mlflow-creds"}}]


def test_service_ports() -> None:
    service = build_children(context(service={"port": 9000, "type": "NodePort"}))[1]
    assert service["spec"]["type"] == "NodePort"
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("http", 9000), ("grpc", 8081),
                                                                        ("metrics", 8082)]


def test_builders_are_deterministic() -> None:
    assert build_children(context()) == build_children(context())


def runtime_env(ctx: BuildContext) -> dict[str, str]:
    runtime = build_children(ctx)[0]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in runtime["env"]}


def test_max_batch_size_reaches_the_runtime_only_when_set() -> None:
    assert runtime_env(context(serving={"maxBatchSize": 16}))["PHI3_MAX_BATCH_SIZE"] == "16"
    # Unset: the engine picks its own default, and existing Deployments keep their template.
    assert "PHI3_MAX_BATCH_SIZE" not in runtime_env(context())


@pytest.mark.parametrize("value", [0, 257, "8", True])
def test_max_batch_size_out_of_range_is_a_spec_error(value: object) -> None:
    with pytest.raises(SpecError, match="maxBatchSize"):
        context(serving={"maxBatchSize": value})
