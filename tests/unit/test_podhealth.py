"""pod_problem: the cause of a pod that does not serve, from pod status documents as the API returns them."""

from __future__ import annotations

from typing import Any

import pytest

from phi3_operator.podhealth import newest_ready_pod, pod_problem, rollout_stuck, start_phases


def pod(init: list[dict[str, Any]] | None = None, containers: list[dict[str, Any]] | None = None,
        ready: bool = False, limit: str | None = "200Mi") -> dict[str, Any]:
    resources = {"limits": {"memory": limit}} if limit else {}
    return {
        "metadata": {"name": "tiny-abc"},
        "spec": {"initContainers": [{"name": "fetch-model"}],
                 "containers": [{"name": "runtime", "resources": resources}]},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                   "initContainerStatuses": init or [], "containerStatuses": containers or []},
    }


def terminated(reason: str, code: int, message: str = "") -> dict[str, Any]:
    return {"terminated": {"reason": reason, "exitCode": code, "message": message}}


def test_oomkilled_runtime_names_the_limit_and_the_field() -> None:
    problem = pod(containers=[{"name": "runtime", "restartCount": 2,
                               "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                               "lastState": terminated("OOMKilled", 137)}])
    found = pod_problem([problem])
    assert found is not None
    assert found.reason == "OOMKilled"
    assert "memory limit 200Mi" in found.message and "spec.resources.limits.memory" in found.message


def test_oomkilled_without_a_limit_says_so() -> None:
    found = pod_problem([pod(containers=[{"name": "runtime", "state": terminated("OOMKilled", 137)}], limit=None)])
    assert found is not None and "no limit set" in found.message


def test_a_failed_fetch_carries_the_init_containers_message() -> None:
    found = pod_problem([pod(init=[{"name": "fetch-model", "restartCount": 1,
                                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                    "lastState": terminated("Error", 1, "RESOURCE_DOES_NOT_EXIST: model gone")}])])
    assert found is not None
    assert found.reason == "ModelFetchFailed"
    assert "RESOURCE_DOES_NOT_EXIST: model gone" in found.message and "exit code 1" in found.message


def test_image_pull_failures_name_the_image() -> None:
    waiting = {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}
    found = pod_problem([pod(containers=[{"name": "runtime", "image": "reg/x:1", "state": waiting}])])
    assert found is not None and found.reason == "ImagePullFailed" and "reg/x:1" in found.message


def test_a_crash_looping_runtime() -> None:
    found = pod_problem([pod(containers=[{"name": "runtime", "restartCount": 3,
                                          "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                          "lastState": terminated("Error", 1, "Traceback ... ValueError: bad")}])])
    assert found is not None and found.reason == "RuntimeCrashLoop" and "ValueError: bad" in found.message


def test_a_model_that_fails_to_load() -> None:
    from phi3_operator.podhealth import MODEL_LOAD_FAILED_MARKER
    from phi3_serving.serve import LOAD_FAILED_PREFIX

    assert LOAD_FAILED_PREFIX.endswith(MODEL_LOAD_FAILED_MARKER)
    last_words = f"Traceback ...\n{LOAD_FAILED_PREFIX}m: FileNotFoundError: weights.bin is missing\n"
    found = pod_problem([pod(containers=[{"name": "runtime", "restartCount": 2,
                                          "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                                          "lastState": terminated("Error", 1, last_words)}])])
    assert found is not None and found.reason == "ModelLoadFailed"
    assert found.message.endswith("m: FileNotFoundError: weights.bin is missing")


@pytest.mark.parametrize("ready, deleting", [(True, False), (False, True)])
def test_ready_or_terminating_pods_explain_nothing(ready: bool, deleting: bool) -> None:
    document = pod(containers=[{"name": "runtime", "state": terminated("OOMKilled", 137)}], ready=ready)
    if deleting:
        document["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_problem([document]) is None


def test_a_starting_pod_explains_nothing() -> None:
    assert pod_problem([pod(init=[{"name": "fetch-model", "state": {"running": {}}}])]) is None


def test_long_messages_are_cut_to_their_tail() -> None:
    found = pod_problem([pod(init=[{"name": "fetch-model", "state": terminated("Error", 1, "x" * 5000 + " END")}])])
    assert found is not None and found.message.endswith("END") and len(found.message) < 800


@pytest.mark.parametrize("updated, stuck", [("2026-01-01T00:00:00Z", True), ("2026-01-01T00:00:55Z", False)])
def test_pods_are_read_only_once_a_rollout_has_stalled(updated: str, stuck: bool) -> None:
    deployment = {"status": {"conditions": [{"type": "Progressing", "lastUpdateTime": updated}]}}
    assert rollout_stuck(deployment, "2026-01-01T00:01:00Z") is stuck
    assert rollout_stuck({"status": {}}, "2026-01-01T00:01:00Z") is False


def test_an_unpullable_model_image_volume_is_named_not_the_runtime_image() -> None:
    model_image = "reg/phi3-models/m@sha256:" + "b" * 64
    waiting = {"waiting": {"reason": "ErrImagePull", "message": f'failed to pull "{model_image}": not found'}}
    broken = pod(containers=[{"name": "runtime", "image": "reg/runtime:1", "state": waiting}])
    broken["spec"]["volumes"] = [{"name": "models", "image": {"reference": model_image}}]
    found = pod_problem([broken])
    assert found is not None and found.reason == "ImagePullFailed"
    assert f"the model image {model_image}" in found.message and "reg/runtime:1" not in found.message


def started_pod(name: str, created: str, ready_at: str | None) -> dict[str, Any]:
    conditions = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": created},
                  {"type": "Initialized", "status": "True", "lastTransitionTime": created}]
    if ready_at:
        conditions.append({"type": "Ready", "status": "True", "lastTransitionTime": ready_at})
    return {"metadata": {"name": name, "creationTimestamp": created},
            "status": {"conditions": conditions, "containerStatuses": [
                {"name": "runtime", "state": {"running": {"startedAt": "2026-01-01T00:00:02Z"}}}]}}


def test_start_phases_and_the_newest_ready_pod() -> None:
    first = started_pod("a", "2026-01-01T00:00:00Z", "2026-01-01T00:00:07Z")
    assert start_phases(first) == {"scheduled": 0.0, "fetched": 0.0, "ready": 7.0, "runtime_started": 2.0}
    newer = started_pod("b", "2026-01-01T00:00:01Z", "2026-01-01T00:00:09Z")
    starting = started_pod("c", "2026-01-01T00:00:05Z", None)
    assert newest_ready_pod([first, newer, starting]) is newer
    assert newest_ready_pod([starting]) is None
