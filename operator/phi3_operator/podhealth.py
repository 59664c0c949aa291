"""Why a model's pods are not serving, read from their status: pure, no I/O.

A Deployment only says "0/1 available". The pods say why: the runtime was OOMKilled at its memory
limit, the init container could not fetch the model, the image cannot be pulled, the runtime
crash-loops. `pod_problem` turns the first such cause into a condition reason and a message a
person can act on; the reconciler puts it on the Phi3Model instead of leaving a pod stuck in Init.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

FETCH_CONTAINER = "fetch-model"
RUNTIME_CONTAINER = "runtime"
IMAGE_PULL_WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName")
# Kubernetes caps a termination message at 4096 bytes; a condition message should stay readable.
MESSAGE_TAIL_CHARS = 600


# Pods get this long to come up before their status is read: a healthy rollout never costs a pod list.
SETTLE_S = 10.0


def rollout_stuck(deployment: Mapping[str, Any], now: str) -> bool:
    """Has the rollout made no progress for SETTLE_S? (The Deployment controller moves `Progressing`'s
    lastUpdateTime whenever a replica comes up.) A Deployment without the condition has just been
    made, so nothing can be stuck yet: a new model costs no pod list."""
    progressing = next((c for c in deployment.get("status", {}).get("conditions", [])
                        if c.get("type") == "Progressing"), None)
    if not progressing or not progressing.get("lastUpdateTime"):
        return False
    try:
        since = datetime.fromisoformat(str(progressing["lastUpdateTime"]).replace("Z", "+00:00"))
        current = datetime.fromisoformat(now.replace("Z", "+00:00"))
    except ValueError:
        return True
    return (current - since).total_seconds() >= SETTLE_S


@dataclass(frozen=True)
class PodProblem:
    reason: str  # one of status.REASON_TABLE's pod reasons
    message: str
    pod: str


# What `phi3-operator serve` prints last when the model fails to load (tested against phi3_serving.serve).
MODEL_LOAD_FAILED_MARKER = "the model failed to load: "


def _tail(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_TAIL_CHARS else "..." + text[-MESSAGE_TAIL_CHARS:]


def _memory_limit(pod: Mapping[str, Any], container: str) -> str | None:
    spec = pod.get("spec", {})
    for item in (*spec.get("initContainers", []), *spec.get("containers", [])):
        if item.get("name") == container:
            limit = item.get("resources", {}).get("limits", {}).get("memory")
            return str(limit) if limit else None
    return None


def _image_volumes(pod: Mapping[str, Any]) -> list[str]:
    return [str(v["image"].get("reference", "")) for v in pod.get("spec", {}).get("volumes", []) if "image" in v]


def _terminations(status: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    for key in ("state", "lastState"):
        terminated = status.get(key, {}).get("terminated")
        if terminated:
            yield terminated


def _container_problem(pod: Mapping[str, Any], status: Mapping[str, Any], init: bool) -> tuple[str, str] | None:
    name = str(status.get("name", ""))
    for terminated in _terminations(status):
        if terminated.get("reason") == "OOMKilled":
            limit = _memory_limit(pod, name)
            where = f"its memory limit {limit}" if limit else "the node's memory (no limit set)"
            field = "spec.resources.limits.memory" if name == RUNTIME_CONTAINER else "the fetch container's limit"
            return ("OOMKilled", f"container {name} was OOMKilled at {where}; the model needs more memory: "
                    f"raise {field}")
    waiting = status.get("state", {}).get("waiting", {})
    if waiting.get("reason") in IMAGE_PULL_WAITING:
        said = str(waiting.get("message", waiting["reason"]))
        # The kubelet reports a model image volume that cannot be pulled on the container that mounts it.
        model_image = next((ref for ref in _image_volumes(pod) if ref in said), None)
        what = f"the model image {model_image} (an image volume)" if model_image else status.get("image", "")
        return ("ImagePullFailed", f"container {name} cannot pull {what}: {_tail(said)}")
    failed = next((t for t in _terminations(status) if t.get("exitCode", 0) != 0), None)
    if failed is None:
        return None
    detail = _tail(str(failed.get("message") or failed.get("reason") or ""))
    if MODEL_LOAD_FAILED_MARKER in detail:
        # The runtime said it: the model's own code (load_context, an import) raised while loading.
        error = detail.rsplit(MODEL_LOAD_FAILED_MARKER, 1)[1].strip()
        return ("ModelLoadFailed", f"the model failed to load in container {name} (exit code "
                f"{failed.get('exitCode')}, {status.get('restartCount', 0)} restarts): {error}")
    if init and name == FETCH_CONTAINER:
        return ("ModelFetchFailed", f"the init container could not fetch the model (exit code "
                f"{failed.get('exitCode')}): {detail}")
    if waiting.get("reason") == "CrashLoopBackOff" or status.get("restartCount", 0) > 0:
        return ("RuntimeCrashLoop", f"container {name} keeps exiting (exit code {failed.get('exitCode')}, "
                f"{status.get('restartCount', 0)} restarts): {detail}")
    return None


def pod_problem(pods: Iterable[Mapping[str, Any]]) -> PodProblem | None:
    """The first reason among pods that are not Ready; None when nothing explains a wait."""
    for pod in pods:
        if pod.get("metadata", {}).get("deletionTimestamp"):
            continue
        status = pod.get("status", {})
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
        if ready:
            continue
        for init, key in ((True, "initContainerStatuses"), (False, "containerStatuses")):
            for container in status.get(key, []):
                found = _container_problem(pod, container, init)
                if found:
                    return PodProblem(reason=found[0], message=found[1], pod=str(pod["metadata"].get("name", "")))
    return None


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def start_phases(pod: Mapping[str, Any]) -> dict[str, float]:
    """Seconds from the pod's creation to: scheduled, model fetched (init containers done; about 0 with
    an image volume), runtime started, Ready. Only the phases the pod has reached."""
    created = _time(pod.get("metadata", {}).get("creationTimestamp"))
    if created is None:
        return {}
    status = pod.get("status", {})
    conditions = {c.get("type"): c for c in status.get("conditions", [])}
    moments: dict[str, Any] = {}
    for phase, condition in (("scheduled", "PodScheduled"), ("fetched", "Initialized"), ("ready", "Ready")):
        if conditions.get(condition, {}).get("status") == "True":
            moments[phase] = conditions[condition].get("lastTransitionTime")
    runtime: Mapping[str, Any] = next(
        (c for c in status.get("containerStatuses", []) if c.get("name") == RUNTIME_CONTAINER), {})
    moments["runtime_started"] = runtime.get("state", {}).get("running", {}).get("startedAt")
    phases = {}
    for phase, moment in moments.items():
        at = _time(moment) if moment else None
        if at is not None:
            phases[phase] = (at - created).total_seconds()
    return phases


def newest_ready_pod(pods: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    ready = [p for p in pods if not p.get("metadata", {}).get("deletionTimestamp")
             and "ready" in start_phases(p)]
    return max(ready, key=lambda p: str(p["metadata"].get("creationTimestamp", "")), default=None)
