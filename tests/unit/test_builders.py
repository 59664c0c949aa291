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


def test_api_keys_are_a_mounted_secret_never_env() -> None:
    deployment = build_children(context(auth={"apiKeySecretRef": {"name": "phi3-keys"}}))[0]
    pod = deployment["spec"]["template"]["spec"]
    runtime = pod["containers"][0]
    env = {e["name"]: e for e in runtime["env"]}
    assert env["PHI3_API_KEYS_DIR"]["value"] == "/var/run/secrets/phi3.ai/api-keys"
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in runtime["env"])
    mount = next(m for m in runtime["volumeMounts"] if m["name"] == "api-keys")
    assert mount == {"name": "api-keys", "mountPath": "/var/run/secrets/phi3.ai/api-keys", "readOnly": True}
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"] == {"secretName": "phi3-keys", "defaultMode": 0o440}
    # The fetch init container needs no key.
    assert all(m["name"] != "api-keys" for m in pod["initContainers"][0]["volumeMounts"])
    plain = build_children(context())[0]["spec"]["template"]["spec"]
    assert all(v["name"] != "api-keys" for v in plain["volumes"])
    assert "PHI3_API_KEYS_DIR" not in {e["name"] for e in plain["containers"][0]["env"]}


def test_network_policy_admits_the_peers_to_serving_and_monitoring_to_metrics() -> None:
    peers = [{"namespaceSelector": {"matchLabels": {"team": "apps"}}},
             {"podSelector": {"matchLabels": {"role": "gateway"}}}]
    monitoring = ({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},)
    ctx = context(network={"allowFrom": peers})
    ctx = BuildContext(**{**ctx.__dict__, "monitoring_peers": monitoring})
    assert kinds(ctx) == ["Deployment", "Service", "NetworkPolicy"]
    policy = build_children(ctx)[-1]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "phi3-model",
                                                   "app.kubernetes.io/instance": "phi3-mini"}}
    assert spec["policyTypes"] == ["Ingress"]
    serving, metrics = spec["ingress"]
    assert serving == {"from": peers, "ports": [{"protocol": "TCP", "port": 8080}, {"protocol": "TCP", "port": 8081}]}
    assert metrics == {"from": list(monitoring), "ports": [{"protocol": "TCP", "port": 8082}]}


def test_network_policy_with_no_peers_admits_nobody_to_serving() -> None:
    policy = build_children(context(network={"allowFrom": []}))[-1]
    # No rule at all for the serving ports (an empty `from` would admit everyone).
    assert policy["spec"]["ingress"] == []


def test_a_peer_without_selectors_is_refused() -> None:
    with pytest.raises(SpecError, match="needs a namespaceSelector, a podSelector or both"):
        parse_spec({"model": {"uri": "models:/m/1"}, "hardware": {"target": "cpu"}, "network": {"allowFrom": [{}]}})


def test_request_bounds_reach_the_runtime_only_when_set() -> None:
    runtime = build_children(context(serving={"maxRequestBytes": 2048, "maxQueuedRequests": 3}))[0]
    env = {e["name"]: e.get("value") for e in runtime["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PHI3_MAX_REQUEST_BYTES"] == "2048" and env["PHI3_MAX_QUEUED_REQUESTS"] == "3"
    plain = build_children(context())[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not {"PHI3_MAX_REQUEST_BYTES", "PHI3_MAX_QUEUED_REQUESTS"} & {e["name"] for e in plain}
