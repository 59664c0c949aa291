"""Elastic serving: the spec's autoscaling fields, the Knative Configuration, the Revision's status, and
the reconcile's choice between Knative and the HPA is in test_reconcile.
tests/cluster/test_realnode_elastic.py runs it all on the real node with Knative Serving."""

from __future__ import annotations

from typing import Any

import pytest

from phi3_operator.builders import BuildContext, Owner, build_children
from phi3_operator.builders.knative import FULL_DUPLEX_ANNOTATION, build_configuration
from phi3_operator.spec import DEFAULT_TARGET_REQUESTS_PER_REPLICA, SpecError, parse_spec
from phi3_operator.status import build_status, revision_available

NS = "llm"


def raw_spec(**autoscaling: Any) -> dict[str, Any]:
    return {"model": {"uri": "models:/phi3/1"}, "hardware": {"target": "cpu"}, "autoscaling": autoscaling}


def context(knative: bool, **autoscaling: Any) -> BuildContext:
    return BuildContext(owner=Owner("phi3", NS, "uid-1"), spec=parse_spec(raw_spec(**autoscaling)),
                        image="runtime:cpu", model_uri="models:/phi3/1", tracking_uri="http://mlflow:5000",
                        onnx_variant="cpu-int4", knative=knative)


def test_requests_per_replica_is_the_default_and_its_target_is_the_batch_size() -> None:
    assert parse_spec(raw_spec()).autoscaling.metric == "RequestsPerReplica"  # type: ignore[union-attr]
    plain = parse_spec(raw_spec()).autoscaling
    assert plain is not None and plain.target_requests_per_replica == DEFAULT_TARGET_REQUESTS_PER_REPLICA
    batched = parse_spec({**raw_spec(), "serving": {"maxBatchSize": 12}}).autoscaling
    assert batched is not None and batched.target_requests_per_replica == 12
    explicit = parse_spec({**raw_spec(targetRequestsPerReplica=3), "serving": {"maxBatchSize": 12}}).autoscaling
    assert explicit is not None and explicit.target_requests_per_replica == 3


@pytest.mark.parametrize("autoscaling, message", [
    ({"minReplicas": 0, "metric": "CPU"}, "needs metric RequestsPerReplica"),
    ({"minReplicas": 3, "maxReplicas": 2}, "less than or equal"),
    ({"targetRequestsPerReplica": 0}, ">= 1"),
])
def test_what_cannot_scale_is_refused(autoscaling: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(raw_spec(**autoscaling))


def test_the_configuration_carries_the_autoscaling_and_a_pod_knative_accepts() -> None:
    manifest = build_configuration(context(True, minReplicas=0, maxReplicas=3, scaleDownDelaySeconds=60,
                                           activationTimeoutSeconds=120))
    template = manifest["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == "0"
    assert annotations["autoscaling.knative.dev/max-scale"] == "3"
    assert annotations["autoscaling.knative.dev/metric"] == "concurrency"
    assert annotations["autoscaling.knative.dev/target"] == str(DEFAULT_TARGET_REQUESTS_PER_REPLICA)
    assert annotations["autoscaling.knative.dev/scale-down-delay"] == "60s"
    assert annotations[FULL_DUPLEX_ANNOTATION] == "Enabled"
    pod = template["spec"]
    assert pod["responseStartTimeoutSeconds"] == 120 and pod["timeoutSeconds"] == 600
    assert "terminationGracePeriodSeconds" not in pod
    (runtime,) = pod["containers"]
    assert runtime["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert "lifecycle" not in runtime and "startupProbe" not in runtime
    assert "port" not in runtime["readinessProbe"]["httpGet"] and "port" not in runtime["livenessProbe"]["httpGet"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert runtime["securityContext"]["readOnlyRootFilesystem"] is True
    assert manifest["metadata"]["ownerReferences"][0]["kind"] == "Phi3Model"


def test_without_knative_the_hpa_on_cpu_stays_and_never_goes_below_one() -> None:
    kinds = [m["kind"] for m in build_children(context(False, minReplicas=0))]
    assert kinds == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    hpa = build_children(context(False, minReplicas=0, scaleDownDelaySeconds=90))[2]
    assert hpa["spec"]["minReplicas"] == 1
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 90
    assert [m["kind"] for m in build_children(context(True, minReplicas=0))] == ["Configuration"]
    assert next(m["kind"] for m in build_children(context(True, metric="CPU"))) == "Deployment"


def revision(ready: str, active: str, actual: int, since: str = "2026-12-04T03:00:00Z") -> dict[str, Any]:
    return {"metadata": {"name": "phi3-00001"},
            "status": {"actualReplicas": actual, "desiredReplicas": actual,
                       "conditions": [{"type": "Ready", "status": ready, "reason": "X", "message": "why"},
                                      {"type": "Active", "status": active, "lastTransitionTime": since}]}}


CONFIGURATION = {"metadata": {"generation": 1}, "status": {"observedGeneration": 1}}


def test_a_revision_at_zero_is_available_and_says_since_when_it_idles() -> None:
    available, desired, ready, since = revision_available(CONFIGURATION, revision("True", "False", 0))
    assert (available.status, available.reason, desired, ready) == ("True", "ScaledToZero", 0, 0)
    assert since == "2026-12-04T03:00:00Z" and "next request wakes it" in available.message
    status = build_status({}, _observed([available]), "t")
    by_type = {c["type"]: c["status"] for c in status["conditions"]}
    # kstatus reads Current, Argo CD Healthy: Ready, neither Reconciling nor Stalled.
    assert by_type["Ready"] == "True" and by_type["Reconciling"] == by_type["Stalled"] == "False"


def test_a_serving_starting_or_failed_revision() -> None:
    assert revision_available(CONFIGURATION, revision("True", "True", 2))[0].reason == "MinimumReplicasAvailable"
    assert revision_available(CONFIGURATION, revision("Unknown", "Unknown", 0))[0].reason == "RolloutInProgress"
    failed = revision_available(CONFIGURATION, revision("False", "False", 0))[0]
    assert (failed.status, failed.reason, failed.message) == ("False", "RevisionFailed", "Revision phi3-00001: X: why")
    assert revision_available(None, None)[0].reason == "DeploymentMissing"


def _observed(conditions: list[Any]) -> Any:
    from phi3_operator.status import ObservedState

    return ObservedState(generation=1, conditions=conditions)
