"""How a model reaches its pods: an OCI image volume published once per version, or a download per pod.

With `ImageVolume` a Job runs `phi3-operator publish` once per model version: it pushes the model
as an image (content-addressed: its digest pins it) and the pods mount that image read-only. The
node's image store is then the cache: another replica on the node, a restart and a rollback to a
version the node still holds download nothing. `Download` is the init container of before, for
clusters without image volumes (Kubernetes before 1.35, where the feature was off by default).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from phi3_operator.builders.common import MANAGED_BY, Manifest

DeliveryMode = Literal["ImageVolume", "Download"]
MODEL_REPOSITORY = "phi3-models"
PUBLISH_LABEL = "phi3.ai/publish"
# ImageVolume: beta and on by default in 1.35, GA in 1.36.
IMAGE_VOLUME_MIN_MINOR = 35
# `phi3-operator publish` exit codes (phi3_serving.cli): the model cannot be fetched, the registry refused.
EXIT_FETCH, EXIT_REGISTRY = 3, 4
PUBLISH_WORKDIR = "/scratch"

# Startup budget: MLServer's own start plus reading the weights at a rate any node's disk beats.
STARTUP_BASE_S = 120
STARTUP_LOAD_MB_PER_S = 20
# Every second: the startup probe is what makes a pod Ready once its model has loaded (the kubelet
# probes readiness at once when startup succeeds), so its period is the lag between the two.
STARTUP_PROBE_PERIOD_S = 1
STARTUP_MAX_S = 3600
# Unknown size (a downloaded model): the budget of a 9.6 GB model.
STARTUP_DEFAULT_S = 600
STARTUP_DEFAULT_FAILURES = STARTUP_DEFAULT_S // STARTUP_PROBE_PERIOD_S


@dataclass(frozen=True)
class DeliveryChoice:
    mode: DeliveryMode
    repository: str  # REGISTRY/.../phi3-models/NAME where the model image goes; "" for Download
    why: str


def choose_delivery(
    requested: str, model_registry: str, spec_registry: str, server_minor: int | None, model_name: str
) -> DeliveryChoice:
    """`Auto` takes image volumes where the operator has a model registry and the API server is new
    enough; `ImageVolume` insists (and may use the model's own `image.registry`)."""
    registry = model_registry or (spec_registry if requested == "ImageVolume" else "")
    repository = f"{registry.rstrip('/')}/{MODEL_REPOSITORY}/{repository_name(model_name)}" if registry else ""
    if requested == "Download":
        return DeliveryChoice("Download", "", "model.delivery is Download")
    if requested == "ImageVolume":
        return DeliveryChoice("ImageVolume", repository, "model.delivery is ImageVolume")
    if not registry:
        return DeliveryChoice("Download", "", "no model registry is configured (the chart's config.modelRegistry)")
    if server_minor is not None and server_minor < IMAGE_VOLUME_MIN_MINOR:
        return DeliveryChoice("Download", "", f"Kubernetes 1.{server_minor} has image volumes off by default")
    return DeliveryChoice("ImageVolume", repository, f"model images go to {registry}")


def repository_name(model_name: str) -> str:
    """An OCI repository path component: lowercase [a-z0-9], single separators."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")
    return cleaned[:100] or "model"


@dataclass(frozen=True)
class PublishRequest:
    model_uri: str  # resolved and immutable: the tag stands for exactly these bytes
    version: str
    tracking_uri: str
    repository: str
    namespace: str
    runtime_image: str  # carries `phi3-operator publish` and MLflow
    plain_http: bool = False
    credentials_secret: str = ""
    push_secret: str = ""
    node_selector: Mapping[str, str] | None = None
    tolerations: tuple[Mapping[str, Any], ...] = ()

    @property
    def key(self) -> str:
        document = json.dumps({"model": self.model_uri, "tracking": self.tracking_uri, "repo": self.repository},
                              sort_keys=True)
        return hashlib.sha256(document.encode()).hexdigest()[:16]

    @property
    def tag(self) -> str:
        version = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.version)[:40]
        return f"v{version}-{self.key}" if version else self.key

    @property
    def image(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def name(self) -> str:
        return f"phi3-publish-{self.key}"


def publish_labels(request: PublishRequest) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/component": "model-publish",
        PUBLISH_LABEL: request.key,
    }


def publish_job(request: PublishRequest) -> Manifest:
    """Runs `phi3-operator publish`; its result (the pinned image) is the pod's termination message."""
    command = ["phi3-operator", "publish", "--model-uri", request.model_uri, "--image", request.image,
               "--workdir", PUBLISH_WORKDIR, "--result-file", "/dev/termination-log"]
    if request.plain_http:
        command.append("--plain-http")
    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"},
                                 {"name": "MLFLOW_TRACKING_URI", "value": request.tracking_uri}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, {"name": "scratch", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"},
                                    {"name": "scratch", "mountPath": PUBLISH_WORKDIR}]
    if request.push_secret:
        env.append({"name": "DOCKER_CONFIG", "value": "/etc/phi3-registry"})
        items = [{"key": ".dockerconfigjson", "path": "config.json"}]
        volumes.append({"name": "registry-auth", "secret": {"secretName": request.push_secret, "items": items}})
        mounts.append({"name": "registry-auth", "mountPath": "/etc/phi3-registry", "readOnly": True})
    container: dict[str, Any] = {
        "name": "publish",
        "image": request.runtime_image,
        "command": command,
        "env": env,
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": mounts,
        # A failure's last log line (`phi3-operator publish: cannot fetch ...`) becomes the message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if request.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": request.credentials_secret}}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if request.node_selector:
        pod_spec["nodeSelector"] = dict(request.node_selector)
    if request.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in request.tolerations]
    labels = publish_labels(request)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": request.name, "namespace": request.namespace, "labels": labels,
                     "annotations": {"phi3.ai/image": request.image, "phi3.ai/model-uri": request.model_uri}},
        "spec": {
            "backoffLimit": 2,
            # A model that cannot be fetched will not be fetched on a second try: fail at once.
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                "containerName": "publish", "operator": "In", "values": [EXIT_FETCH]}}]},
            "activeDeadlineSeconds": 3600,
            # The pinned image lives on in each model's status; the finished Job need not.
            "ttlSecondsAfterFinished": 86400,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


@dataclass(frozen=True)
class PublishOutcome:
    state: Literal["Missing", "Publishing", "Published", "Unfetchable", "RegistryFailed", "Failed"]
    message: str = ""
    image: str = ""  # REGISTRY/REPO@sha256:... once published
    size_bytes: int = 0


def publish_outcome(job: Mapping[str, Any] | None, pods: Iterable[Mapping[str, Any]]) -> PublishOutcome:
    """What a publish Job came to, from the Job and its pods' termination messages."""
    if job is None:
        return PublishOutcome("Missing")
    name = job["metadata"]["name"]
    finished = [state for pod in pods for state in _terminated(pod)]
    for condition in job.get("status", {}).get("conditions", []):
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            for state in finished:
                if state.get("exitCode") == 0:
                    try:
                        result = json.loads(state.get("message") or "")
                        return PublishOutcome("Published", f"published {result['image']}", str(result["image"]),
                                              int(result.get("sizeBytes", 0)))
                    except (ValueError, KeyError, TypeError):
                        break
            return PublishOutcome("Failed", f"publish Job {name} completed without a result (its pod is gone)")
        if condition.get("type") == "Failed":
            last: Mapping[str, Any] = next((s for s in reversed(finished) if s.get("exitCode")), {})
            said = str(last.get("message") or condition.get("message") or condition.get("reason", "")).strip()
            line = said.splitlines()[-1] if said else ""
            exit_code = int(last.get("exitCode", 1))
            if exit_code == EXIT_FETCH:
                return PublishOutcome("Unfetchable", f"publish Job {name} failed: {line}")
            if exit_code == EXIT_REGISTRY:
                return PublishOutcome("RegistryFailed", f"publish Job {name} failed: {line}")
            return PublishOutcome("Failed", f"publish Job {name} failed: {line}")
    return PublishOutcome("Publishing", f"publishing the model in Job {name}")


def _terminated(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    return [s["state"]["terminated"] for s in statuses if "terminated" in s.get("state", {})]


def startup_failure_threshold(size_bytes: int) -> int:
    """startupProbe failures (every STARTUP_PROBE_PERIOD_S) that cover loading `size_bytes`: a slow
    load of a big model is not killed, a hung small one is found within minutes."""
    if size_bytes <= 0:
        return STARTUP_DEFAULT_FAILURES
    budget_s = min(STARTUP_MAX_S, STARTUP_BASE_S + size_bytes / 1e6 / STARTUP_LOAD_MB_PER_S)
    return math.ceil(budget_s / STARTUP_PROBE_PERIOD_S)
