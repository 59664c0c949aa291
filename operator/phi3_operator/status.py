"""Conditions and status, following the Kubernetes API conventions (and so kstatus, Flux, Argo CD)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]
CONDITION_TYPES = ("ModelResolved", "ImageReady", "Available", "Ready")


@dataclass(frozen=True)
class Condition:
    type: str
    status: ConditionStatus
    reason: str
    message: str


@dataclass(frozen=True)
class ObservedState:
    """What reconcile learned this pass; `build_status` turns it into the status document."""

    generation: int
    conditions: Sequence[Condition]
    model: Mapping[str, Any] = field(default_factory=dict)
    image: str = ""
    endpoint: Mapping[str, str] = field(default_factory=dict)
    replicas: int = 0
    ready_replicas: int = 0
    building: bool = False


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def merge_conditions(
    existing: Sequence[Mapping[str, Any]], desired: Sequence[Condition], generation: int, now: str
) -> list[dict[str, Any]]:
    """New condition list; lastTransitionTime moves only when a condition's status changes."""
    previous = {c.get("type"): c for c in existing}
    merged = []
    for condition in desired:
        old = previous.get(condition.type)
        transitioned = old is None or old.get("status") != condition.status
        merged.append(
            {
                "type": condition.type,
                "status": condition.status,
                "reason": condition.reason,
                "message": condition.message,
                "observedGeneration": generation,
                "lastTransitionTime": now if transitioned or old is None else old.get("lastTransitionTime", now),
            }
        )
    return merged


def ready_condition(conditions: Sequence[Condition]) -> Condition:
    """Ready is the conjunction of the others; its reason is the first one that is not True."""
    for condition in conditions:
        if condition.status != "True":
            return Condition("Ready", "False", condition.reason, condition.message)
    return Condition("Ready", "True", "Ready", "The model is served and all replicas are ready")


def phase_of(conditions: Sequence[Condition], building: bool) -> str:
    by_type = {c.type: c for c in conditions}
    if all(c.status == "True" for c in conditions):
        return "Ready"
    failed_reasons = {"InvalidSpec", "ModelNotFound", "NoCompatibleImage", "BuildFailed", "InvalidModel",
                      "RegistryRequired"}
    if any(c.status == "False" and c.reason in failed_reasons for c in conditions):
        return "Failed"
    resolved = by_type.get("ModelResolved")
    if resolved is not None and resolved.status != "True":
        return "Resolving" if resolved.reason != "MLflowUnavailable" else "Pending"
    if building:
        return "Building"
    return "Deploying"


def deployment_available(deployment: Mapping[str, Any] | None) -> tuple[Condition, int, int]:
    """The Available condition plus (desired replicas, ready replicas) read from the live Deployment."""
    if deployment is None:
        return Condition("Available", "False", "DeploymentMissing", "The Deployment does not exist yet"), 0, 0
    spec = deployment.get("spec", {})
    status = deployment.get("status", {})
    desired = int(spec.get("replicas", 1))
    ready = int(status.get("readyReplicas", 0))
    available = int(status.get("availableReplicas", 0))
    updated = int(status.get("updatedReplicas", 0))
    current_generation = status.get("observedGeneration", 0) >= deployment.get("metadata", {}).get("generation", 0)
    # The message names only what a reader acts on (how many replicas serve), so the controller's
    # intermediate steps of one rollout do not each cost a status write.
    in_progress = Condition("Available", "False", "RolloutInProgress",
                            f"rollout in progress: {available}/{desired} replicas available")
    if not current_generation:
        return in_progress, desired, ready
    if desired == 0:
        return Condition("Available", "True", "ScaledToZero", "The Deployment is scaled to zero"), 0, ready
    if updated >= desired and available >= desired:
        return Condition("Available", "True", "MinimumReplicasAvailable",
                         f"{available}/{desired} replicas are available"), desired, ready
    for cond in status.get("conditions", []):
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return Condition("Available", "False", "ProgressDeadlineExceeded", cond.get("message", "")), desired, ready
    return in_progress, desired, ready


def build_status(current: Mapping[str, Any], observed: ObservedState, now: str) -> dict[str, Any]:
    conditions = [*observed.conditions, ready_condition(observed.conditions)]
    status: dict[str, Any] = {
        "observedGeneration": observed.generation,
        "phase": phase_of(observed.conditions, observed.building),
        "conditions": merge_conditions(current.get("conditions", []), conditions, observed.generation, now),
        "replicas": observed.replicas,
        "readyReplicas": observed.ready_replicas,
        # For the Ready printer column: JSONPath cannot format "ready/desired" itself.
        "readyReplicasText": f"{observed.ready_replicas}/{observed.replicas}",
    }
    if observed.model:
        status["model"] = dict(observed.model)
    if observed.image:
        status["image"] = observed.image
    if observed.endpoint:
        status["endpoint"] = dict(observed.endpoint)
    return status


def status_changed(current: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """True when writing `new` would change anything a reader sees (kopf's own keys aside)."""
    return any(current.get(key) != value for key, value in new.items())


def endpoint_urls(name: str, namespace: str, port: int) -> dict[str, str]:
    base = f"http://{name}.{namespace}.svc:{port}"
    return {
        "url": base,
        "chatCompletions": f"{base}/v1/chat/completions",
        "v2Infer": f"{base}/v2/models/{name}/infer",
        "invocations": f"{base}/invocations",
    }
