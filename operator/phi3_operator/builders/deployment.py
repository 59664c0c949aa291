"""The runtime Deployment: MLServer serves the model from an image volume, or from what an init
container downloaded."""

from __future__ import annotations

from typing import Any

from phi3_operator.builders.common import (
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    MODEL_DIR,
    BuildContext,
    Manifest,
    labels,
    metadata,
    selector_labels,
)
from phi3_operator.builders.delivery import STARTUP_PROBE_PERIOD_S, startup_failure_threshold
from phi3_operator.spec import FIELDS_BY_PATH

RUNTIME_UID = 1000
# spec.auth's Secret, mounted (never env: a Secret volume follows the Secret's changes, so keys rotate
# without a restart, and env would show in `kubectl describe`). The runtime reads PHI3_API_KEYS_DIR.
API_KEYS_DIR = "/var/run/secrets/phi3.ai/api-keys"
ENV_API_KEYS_DIR = "PHI3_API_KEYS_DIR"
DEFAULT_CPU_RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "1", "memory": "2Gi"},
    "limits": {"memory": "8Gi"},
}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# A terminating pod keeps serving while Services drop it: kube-proxy on every node and any load balancer
# learn of the removal a few seconds after the kubelet does, and until then new requests still arrive.
PRE_STOP_SLEEP_S = 5
# Then SIGTERM: MLServer stops accepting and finishes the streams it has; a long answer takes a while.
TERMINATION_GRACE_S = 60

CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def runtime_resources(ctx: BuildContext) -> dict[str, Any]:
    resources: dict[str, Any] = {
        key: dict(value) for key, value in (ctx.spec.resources or DEFAULT_CPU_RESOURCES).items()
    }
    hw = ctx.spec.hardware
    if hw.target == "cuda":
        # Extended resources must be equal in requests and limits; limits alone implies both.
        resources.setdefault("limits", {})[hw.gpu_resource_name] = str(hw.gpus)
        resources.get("requests", {}).pop(hw.gpu_resource_name, None)
    return resources


def env_vars(ctx: BuildContext) -> list[dict[str, Any]]:
    gen = ctx.spec.generation
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": "MLFLOW_TRACKING_URI", "value": ctx.tracking_uri},
        {"name": "PHI3_MODEL_NAME", "value": ctx.owner.name},
        {"name": "PHI3_ONNX_VARIANT", "value": ctx.onnx_variant},
        {"name": "PHI3_MAX_TOKENS", "value": str(gen.max_tokens)},
        {"name": "PHI3_TEMPERATURE", "value": str(gen.temperature)},
        {"name": "PHI3_TOP_P", "value": str(gen.top_p)},
    ]
    # Only when set: an unset field must not change (and so roll) existing Deployments.
    serving = ctx.spec.serving
    for path, value in (("serving.maxBatchSize", serving.max_batch_size),
                        ("serving.maxRequestBytes", serving.max_request_bytes),
                        ("serving.maxQueuedRequests", serving.max_queued_requests),
                        ("serving.cpuThreads", serving.cpu_threads)):
        if value is not None:
            env.append({"name": FIELDS_BY_PATH[path].env, "value": str(value)})
    if ctx.spec.auth is not None:
        env.append({"name": ENV_API_KEYS_DIR, "value": API_KEYS_DIR})
    return env


def credentials_env_from(ctx: BuildContext) -> list[dict[str, Any]]:
    secret = ctx.spec.model.credentials_secret
    return [{"secretRef": {"name": secret}}] if secret else []


def model_ready_path(model_name: str) -> str:
    """V2's per-model readiness: 200 only once this model has loaded."""
    return f"/v2/models/{model_name}/ready"


def http_probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def build_deployment(ctx: BuildContext) -> Manifest:
    spec = ctx.spec
    volume_mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if ctx.model_image:
        volume_mounts.append({"name": "models", "mountPath": MODEL_DIR, "readOnly": True})
        models_volume: dict[str, Any] = {"name": "models",
                                         "image": {"reference": ctx.model_image, "pullPolicy": "IfNotPresent"}}
    else:
        volume_mounts.append({"name": "models", "mountPath": "/models"})
        models_volume = {"name": "models", "emptyDir": {}}
    fetch = {
        "name": "fetch-model",
        "image": ctx.image,
        "command": ["phi3-operator", "fetch", "--model-uri", ctx.model_uri, "--dest", MODEL_DIR],
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "MLFLOW_TRACKING_URI", "value": ctx.tracking_uri}],
        "envFrom": credentials_env_from(ctx),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": volume_mounts,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        # A failed fetch's last log line (`cannot fetch URI: why`) becomes the status message the
        # operator reports on the Phi3Model.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    runtime = {
        "name": "runtime",
        "image": ctx.image,
        "command": [
            "phi3-operator", "serve",
            "--model-uri", MODEL_DIR,
            "--model-name", ctx.owner.name,
            "--http-port", str(HTTP_PORT),
            "--grpc-port", str(GRPC_PORT),
            "--metrics-port", str(METRICS_PORT),
        ],
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": env_vars(ctx),
        "envFrom": credentials_env_from(ctx),
        "resources": runtime_resources(ctx),
        # The model's own readiness, not the server's: MLServer's server-level /ready can answer before
        # a model is registered, and a pod must never take traffic it cannot answer.
        "readinessProbe": http_probe(model_ready_path(ctx.owner.name), period=5, failures=3),
        "livenessProbe": http_probe("/v2/health/live", period=10, failures=3),
        # Loading a model can take minutes; liveness must not kill a pod that is still loading, and a
        # load that hangs must end in a restart. So startup waits for the model itself (/ready: MLServer
        # answers /live while it still loads) within a budget that grows with the model's size where
        # it is known (a published model image).
        "startupProbe": http_probe(model_ready_path(ctx.owner.name), period=STARTUP_PROBE_PERIOD_S,
                                   failures=startup_failure_threshold(ctx.model_size_bytes)),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRE_STOP_SLEEP_S}}},
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": volume_mounts,
    }
    for container in (fetch, runtime):
        if not container["envFrom"]:
            del container["envFrom"]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, models_volume]
    if spec.auth is not None:
        runtime["volumeMounts"] = [*volume_mounts, {"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True}]
        # Readable by the runtime's group (fsGroup) only.
        volumes.append({"name": "api-keys", "secret": {"secretName": spec.auth.api_key_secret, "defaultMode": 0o440}})

    pod_spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "containers": [runtime],
        "volumes": volumes,
    }
    if not ctx.model_image:
        pod_spec["initContainers"] = [fetch]
    hw = spec.hardware
    tolerations = [dict(t) for t in hw.tolerations]
    if hw.target == "cuda" and GPU_TOLERATION not in tolerations:
        tolerations.append(GPU_TOLERATION)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if hw.node_selector:
        pod_spec["nodeSelector"] = dict(hw.node_selector)

    deployment_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_labels(ctx.owner)},
        # A new version must be ready before an old pod goes: an outage never drops serving capacity.
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "revisionHistoryLimit": 3,
        "template": {
            "metadata": {
                "labels": labels(ctx.owner),
                "annotations": {"phi3.ai/model-uri": ctx.model_uri},
            },
            "spec": pod_spec,
        },
    }
    # With an HPA the replica count belongs to it; leaving the field out hands it over.
    if spec.autoscaling is None:
        deployment_spec["replicas"] = spec.replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(ctx.owner), "spec": deployment_spec}
