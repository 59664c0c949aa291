"""The Phi3Model spec as frozen dataclasses.

The CRD schema and its CEL rules reject bad specs at apply time; `parse_spec` repeats the
checks the operator relies on, because a CR may predate a stricter CRD.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

URI_PATTERN = re.compile(r"^(models:/|runs:/|s3://|gs://|https?://|file:|/)")
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"


class SpecError(ValueError):
    """The spec cannot be acted on until a person changes it."""


@dataclass(frozen=True)
class ModelSource:
    uri: str
    tracking_uri: str | None = None
    credentials_secret: str | None = None


@dataclass(frozen=True)
class Hardware:
    target: Literal["cpu", "cuda"]
    gpus: int = 0
    gpu_resource_name: str = DEFAULT_GPU_RESOURCE
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class ImageSpec:
    policy: Literal["Auto", "Prebuilt", "Build"] = "Auto"
    override: str = ""
    registry: str = ""
    push_secret: str = ""


@dataclass(frozen=True)
class Autoscaling:
    min_replicas: int = 1
    max_replicas: int = 4
    target_cpu_utilization: int = 80


@dataclass(frozen=True)
class DisruptionBudget:
    min_available: int | str | None = None
    max_unavailable: int | str | None = None


@dataclass(frozen=True)
class Generation:
    max_tokens: int = 512
    temperature: float = 0.2
    top_p: float = 1.0


@dataclass(frozen=True)
class Serving:
    # None leaves the batch size to the engine, which knows its hardware's default.
    max_batch_size: int | None = None


@dataclass(frozen=True)
class ServiceSpec:
    type: str = "ClusterIP"
    port: int = 8080


@dataclass(frozen=True)
class Phi3ModelSpec:
    model: ModelSource
    hardware: Hardware
    image: ImageSpec = ImageSpec()
    replicas: int = 1
    autoscaling: Autoscaling | None = None
    disruption_budget: DisruptionBudget | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)
    generation: Generation = Generation()
    service: ServiceSpec = ServiceSpec()
    serving: Serving = Serving()


def _int(raw: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_spec(raw: Mapping[str, Any]) -> Phi3ModelSpec:
    model_raw = raw.get("model") or {}
    uri = str(model_raw.get("uri") or "")
    if not URI_PATTERN.match(uri):
        raise SpecError(
            f"spec.model.uri {uri!r} must start with models:/, runs:/, s3://, gs://, http(s):// or file:"
        )
    credentials = (model_raw.get("credentialsSecretRef") or {}).get("name")
    model = ModelSource(uri=uri, tracking_uri=model_raw.get("trackingUri") or None, credentials_secret=credentials)

    hw_raw = raw.get("hardware") or {}
    target = hw_raw.get("target")
    if target not in ("cpu", "cuda"):
        raise SpecError(f"spec.hardware.target must be cpu or cuda, got {target!r}")
    if target == "cpu" and "gpus" in hw_raw:
        raise SpecError("spec.hardware.gpus is only allowed with target: cuda")
    hardware = Hardware(
        target=target,
        gpus=_int(hw_raw, "gpus", 1, 1) if target == "cuda" else 0,
        gpu_resource_name=hw_raw.get("gpuResourceName") or DEFAULT_GPU_RESOURCE,
        node_selector=dict(hw_raw.get("nodeSelector") or {}),
        tolerations=tuple(hw_raw.get("tolerations") or ()),
    )

    image_raw = raw.get("image") or {}
    policy = image_raw.get("policy", "Auto")
    if policy not in ("Auto", "Prebuilt", "Build"):
        raise SpecError(f"spec.image.policy must be Auto, Prebuilt or Build, got {policy!r}")
    image = ImageSpec(
        policy=policy,
        override=image_raw.get("override") or "",
        registry=image_raw.get("registry") or "",
        push_secret=(image_raw.get("pushSecretRef") or {}).get("name") or "",
    )

    autoscaling = None
    if raw.get("autoscaling"):
        a = raw["autoscaling"]
        autoscaling = Autoscaling(
            min_replicas=_int(a, "minReplicas", 1, 1),
            max_replicas=_int(a, "maxReplicas", 4, 1),
            target_cpu_utilization=_int(a, "targetCPUUtilizationPercentage", 80, 1),
        )
        if autoscaling.min_replicas > autoscaling.max_replicas:
            raise SpecError("spec.autoscaling.minReplicas must be <= maxReplicas")

    budget = None
    if raw.get("disruptionBudget"):
        b = raw["disruptionBudget"]
        budget = DisruptionBudget(min_available=b.get("minAvailable"), max_unavailable=b.get("maxUnavailable"))

    gen_raw = raw.get("generation") or {}
    generation = Generation(
        max_tokens=_int(gen_raw, "maxTokens", 512, 1),
        temperature=float(gen_raw.get("temperature", 0.2)),
        top_p=float(gen_raw.get("topP", 1.0)),
    )
    serving_raw = raw.get("serving") or {}
    max_batch = serving_raw.get("maxBatchSize")
    if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool)
                                  or not 1 <= max_batch <= 256):
        raise SpecError(f"spec.serving.maxBatchSize must be an integer from 1 to 256, got {max_batch!r}")
    serving = Serving(max_batch_size=max_batch)
    svc_raw = raw.get("service") or {}
    service = ServiceSpec(type=svc_raw.get("type", "ClusterIP"), port=_int(svc_raw, "port", 8080, 1))

    return Phi3ModelSpec(
        model=model,
        hardware=hardware,
        image=image,
        replicas=_int(raw, "replicas", 1, 0),
        autoscaling=autoscaling,
        disruption_budget=budget,
        resources=dict(raw.get("resources") or {}),
        generation=generation,
        service=service,
        serving=serving,
    )
