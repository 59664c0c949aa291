"""The Phi3Model spec: its one statement of defaults, limits and cross-field rules, and the parser.

`FIELDS` and `RULES` below are the source of truth. The CRD's schema and CEL rules
(crds/phi3.ai_phi3models.yaml), the chart's copy of it, the README's resource table and the runtime's
own parsing of the environment the builders write are held to them by tests/unit/test_spec_source.py,
which fails on any drift; `parse_spec` applies them itself, because a CR may predate a stricter CRD.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
Scalar = int | float | str


@dataclass(frozen=True)
class Field:
    """A scalar field of the spec and everything that bounds it."""

    path: str  # dotted, under spec
    type: Literal["integer", "number", "string"]
    default: Scalar | None = None  # what an absent field means; None: no value (optional)
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    enum: tuple[str, ...] = ()
    # False where the default depends on other fields (gpus: cuda only), so the operator applies it.
    crd_default: bool = True
    env: str = ""  # the runtime container's environment variable it becomes

    @property
    def key(self) -> str:
        return self.path.rpartition(".")[2]

    def check(self, value: Any) -> Scalar:
        where = f"spec.{self.path}"
        if self.enum:
            if value not in self.enum:
                raise SpecError(f"{where} must be one of {', '.join(self.enum)}, got {value!r}")
            return str(value)
        if self.type == "string":
            if not isinstance(value, str):
                raise SpecError(f"{where} must be a string, got {value!r}")
            return value
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if self.type == "integer" and not is_int:
            raise SpecError(f"{where} must be an integer, got {value!r}")
        if self.type == "number" and not (is_int or isinstance(value, float)):
            raise SpecError(f"{where} must be a number, got {value!r}")
        low_ok = self.minimum is None or (value > self.minimum if self.exclusive_minimum else value >= self.minimum)
        high_ok = self.maximum is None or value <= self.maximum
        if not (low_ok and high_ok):
            raise SpecError(f"{where} must be {self.range_text()}, got {value!r}")
        return int(value) if self.type == "integer" else float(value)

    def range_text(self) -> str:
        low = "" if self.minimum is None else f"{'>' if self.exclusive_minimum else '>='} {_num(self.minimum)}"
        high = "" if self.maximum is None else f"<= {_num(self.maximum)}"
        return " and ".join(part for part in (low, high) if part)


@dataclass(frozen=True)
class Rule:
    """A CEL rule of the CRD, on the object (or string) at `path`, and the same rule in Python."""

    path: str
    cel: str
    message: str
    holds: Callable[[Any], bool]


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _cel_matches(pattern: str) -> str:
    escaped = pattern.replace("\\", "\\\\")  # a CEL string literal escapes backslashes
    return f"self.matches('{escaped}')"


def _matches(pattern: str) -> Callable[[Any], bool]:
    compiled = re.compile(pattern)  # CEL's matches() is a search, as re.search is
    return lambda value: isinstance(value, str) and compiled.search(value) is not None


URI_REGEX = (r"^(models:/[^/@]+(/[^/]+|@[A-Za-z0-9_-]+)(/.*)?|runs:/[0-9a-zA-Z]+(/.*)?|s3://.+|gs://.+"
             r"|https?://.+|file:.+)$")
TRACKING_URI_REGEX = r"^(https?|databricks|file)(://|:).*$"
RESOURCE_NAME_REGEX = (r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)"
                       r"/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")

FIELDS: tuple[Field, ...] = (
    # Auto: an image volume where the operator has a model registry (and Kubernetes >= 1.35), else Download.
    Field("model.delivery", "string", "Auto", enum=("Auto", "ImageVolume", "Download")),
    Field("hardware.target", "string", enum=("cpu", "cuda")),
    Field("hardware.gpus", "integer", 1, minimum=1, maximum=16, crd_default=False),
    Field("hardware.gpuResourceName", "string", DEFAULT_GPU_RESOURCE, crd_default=False),
    Field("image.policy", "string", "Auto", enum=("Auto", "Prebuilt", "Build")),
    Field("replicas", "integer", 1, minimum=0, maximum=1000),
    # RequestsPerReplica: requests in flight (running plus waiting) per pod, what an LLM's capacity is
    # made of; Knative Serving's autoscaler scales on it, to and from zero. CPU: an HPA, never to zero.
    Field("autoscaling.metric", "string", "RequestsPerReplica", enum=("RequestsPerReplica", "CPU")),
    Field("autoscaling.minReplicas", "integer", 1, minimum=0, maximum=1000),
    Field("autoscaling.maxReplicas", "integer", 4, minimum=1, maximum=1000),
    # None: serving.maxBatchSize (a pod is full when its engine's batch is), else
    # DEFAULT_TARGET_REQUESTS_PER_REPLICA.
    Field("autoscaling.targetRequestsPerReplica", "integer", None, minimum=1, maximum=1000),
    Field("autoscaling.targetCPUUtilizationPercentage", "integer", 80, minimum=1, maximum=100),
    # How long load must stay low before a replica goes (to zero too): a model takes a while to load again.
    Field("autoscaling.scaleDownDelaySeconds", "integer", 300, minimum=0, maximum=3600),
    # How long a request that arrives at zero replicas waits for a pod to be Ready (and its answer to start)
    # before Knative's activator answers 504.
    Field("autoscaling.activationTimeoutSeconds", "integer", 300, minimum=10, maximum=600),
    Field("generation.maxTokens", "integer", 512, minimum=1, maximum=131072, env="PHI3_MAX_TOKENS"),
    Field("generation.temperature", "number", 0.2, minimum=0, maximum=2, env="PHI3_TEMPERATURE"),
    # top_p = 0 would keep no token at all: the runtime refuses it, so the CRD must too.
    Field("generation.topP", "number", 1.0, minimum=0, maximum=1, exclusive_minimum=True, env="PHI3_TOP_P"),
    Field("serving.maxBatchSize", "integer", None, minimum=1, maximum=256, env="PHI3_MAX_BATCH_SIZE"),
    # None: the runtime derives both from what it serves (the model's context, the engine's concurrency).
    Field("serving.maxRequestBytes", "integer", None, minimum=1024, maximum=1 << 30, env="PHI3_MAX_REQUEST_BYTES"),
    Field("serving.maxQueuedRequests", "integer", None, minimum=0, maximum=100000, env="PHI3_MAX_QUEUED_REQUESTS"),
    # None: the model's own setting, else the CPUs the container may use (phi3_serving.cpus).
    Field("serving.cpuThreads", "integer", None, minimum=1, maximum=256, env="PHI3_CPU_THREADS"),
    Field("service.type", "string", "ClusterIP", enum=("ClusterIP", "NodePort", "LoadBalancer")),
    Field("service.port", "integer", 8080, minimum=1, maximum=65535),
)
FIELDS_BY_PATH: Mapping[str, Field] = {f.path: f for f in FIELDS}

RULES: tuple[Rule, ...] = (
    Rule("model.uri", _cel_matches(URI_REGEX),
         "model.uri must be models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH, s3://..., gs://..., "
         "http(s)://... or file:...", _matches(URI_REGEX)),
    Rule("model.trackingUri", _cel_matches(TRACKING_URI_REGEX),
         "model.trackingUri must be an http(s)://, databricks or file: URI", _matches(TRACKING_URI_REGEX)),
    Rule("hardware", "self.target == 'cuda' || !has(self.gpus)",
         "hardware.gpus is only allowed with target: cuda",
         lambda hw: hw.get("target") == "cuda" or "gpus" not in hw),
    Rule("hardware", "self.target == 'cuda' || !has(self.gpuResourceName)",
         "hardware.gpuResourceName is only allowed with target: cuda",
         lambda hw: hw.get("target") == "cuda" or "gpuResourceName" not in hw),
    Rule("hardware.gpuResourceName", _cel_matches(RESOURCE_NAME_REGEX),
         "hardware.gpuResourceName must be a domain-prefixed resource name such as nvidia.com/gpu",
         _matches(RESOURCE_NAME_REGEX)),
    Rule("autoscaling", "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
         "autoscaling.minReplicas must be less than or equal to autoscaling.maxReplicas",
         lambda a: "minReplicas" not in a or "maxReplicas" not in a or a["minReplicas"] <= a["maxReplicas"]),
    Rule("autoscaling", "!has(self.minReplicas) || self.minReplicas > 0 || !has(self.metric) || self.metric != 'CPU'",
         "autoscaling.minReplicas: 0 needs metric RequestsPerReplica: an HPA on CPU cannot scale to zero",
         lambda a: a.get("minReplicas", 1) > 0 or a.get("metric", "RequestsPerReplica") != "CPU"),
    Rule("disruptionBudget", "has(self.minAvailable) != has(self.maxUnavailable)",
         "disruptionBudget needs exactly one of minAvailable or maxUnavailable",
         lambda b: ("minAvailable" in b) != ("maxUnavailable" in b)),
    # An empty peer would admit every pod in the namespace, which nobody means by listing it.
    Rule("network", "!has(self.allowFrom) || self.allowFrom.all(p, has(p.namespaceSelector) || has(p.podSelector))",
         "each network.allowFrom entry needs a namespaceSelector, a podSelector or both",
         lambda n: all(isinstance(p, Mapping) and ("namespaceSelector" in p or "podSelector" in p)
                       for p in n.get("allowFrom") or ())),
)


class SpecError(ValueError):
    """The spec cannot be acted on until a person changes it."""


@dataclass(frozen=True)
class ModelSource:
    uri: str
    tracking_uri: str | None = None
    credentials_secret: str | None = None
    delivery: Literal["Auto", "ImageVolume", "Download"] = "Auto"


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


DEFAULT_TARGET_REQUESTS_PER_REPLICA = 8


@dataclass(frozen=True)
class Autoscaling:
    metric: Literal["RequestsPerReplica", "CPU"] = "RequestsPerReplica"
    min_replicas: int = 1
    max_replicas: int = 4
    target_requests_per_replica: int = DEFAULT_TARGET_REQUESTS_PER_REPLICA
    target_cpu_utilization: int = 80
    scale_down_delay_s: int = 300
    activation_timeout_s: int = 300

    @property
    def on_requests(self) -> bool:
        return self.metric == "RequestsPerReplica"


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
    max_request_bytes: int | None = None
    max_queued_requests: int | None = None
    cpu_threads: int | None = None


@dataclass(frozen=True)
class Auth:
    """Who may call the model: every key of this Secret is a valid `Authorization: Bearer` key."""

    api_key_secret: str


@dataclass(frozen=True)
class NetworkPeer:
    """One NetworkPolicy `from` peer: Kubernetes label selectors, kept as the user wrote them."""

    namespace_selector: Mapping[str, Any] | None = None
    pod_selector: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Network:
    """Set, the operator writes a NetworkPolicy: the serving port admits only these peers."""

    allow_from: tuple[NetworkPeer, ...] = ()


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
    auth: Auth | None = None
    network: Network | None = None


def _at(raw: Mapping[str, Any], path: str) -> Any:
    value: Any = raw
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def check_rules(raw: Mapping[str, Any]) -> None:
    """The CRD's CEL rules, in Python: a SpecError with the CRD's own message for the first that fails."""
    for rule in RULES:
        value = _at(raw, rule.path)
        if value is not None and not rule.holds(value):
            raise SpecError(rule.message)


def value_of(raw: Mapping[str, Any], path: str) -> Any:
    """The checked value at `path`, or the table's default when the field is absent."""
    spec_field = FIELDS_BY_PATH[path]
    value = _at(raw, path)
    return spec_field.default if value is None else spec_field.check(value)


def parse_spec(raw: Mapping[str, Any]) -> Phi3ModelSpec:
    if not isinstance(_at(raw, "model.uri"), str):
        raise SpecError("spec.model.uri is required")
    if _at(raw, "hardware.target") is None:
        raise SpecError("spec.hardware.target is required: cpu or cuda")
    check_rules(raw)

    model_raw = raw.get("model") or {}
    credentials = (model_raw.get("credentialsSecretRef") or {}).get("name")
    model = ModelSource(uri=model_raw["uri"], tracking_uri=model_raw.get("trackingUri") or None,
                        credentials_secret=credentials, delivery=value_of(raw, "model.delivery"))

    hw_raw = raw.get("hardware") or {}
    target = value_of(raw, "hardware.target")
    hardware = Hardware(
        target=target,
        gpus=value_of(raw, "hardware.gpus") if target == "cuda" else 0,
        gpu_resource_name=value_of(raw, "hardware.gpuResourceName"),
        node_selector=dict(hw_raw.get("nodeSelector") or {}),
        tolerations=tuple(hw_raw.get("tolerations") or ()),
    )

    image_raw = raw.get("image") or {}
    image = ImageSpec(
        policy=value_of(raw, "image.policy"),
        override=image_raw.get("override") or "",
        registry=image_raw.get("registry") or "",
        push_secret=(image_raw.get("pushSecretRef") or {}).get("name") or "",
    )

    autoscaling = None
    # `{}` is autoscaling with every default, as the API server fills it in.
    if raw.get("autoscaling") is not None:
        target = value_of(raw, "autoscaling.targetRequestsPerReplica")
        autoscaling = Autoscaling(
            metric=value_of(raw, "autoscaling.metric"),
            min_replicas=value_of(raw, "autoscaling.minReplicas"),
            max_replicas=value_of(raw, "autoscaling.maxReplicas"),
            target_requests_per_replica=(target or value_of(raw, "serving.maxBatchSize")
                                         or DEFAULT_TARGET_REQUESTS_PER_REPLICA),
            target_cpu_utilization=value_of(raw, "autoscaling.targetCPUUtilizationPercentage"),
            scale_down_delay_s=value_of(raw, "autoscaling.scaleDownDelaySeconds"),
            activation_timeout_s=value_of(raw, "autoscaling.activationTimeoutSeconds"),
        )
        # With defaults filled in: minReplicas 6 alone is more than the default maxReplicas.
        if autoscaling.min_replicas > autoscaling.max_replicas:
            raise SpecError("spec.autoscaling.minReplicas must be <= maxReplicas "
                            f"({autoscaling.min_replicas} > {autoscaling.max_replicas})")

    budget = None
    if raw.get("disruptionBudget"):
        b = raw["disruptionBudget"]
        budget = DisruptionBudget(min_available=b.get("minAvailable"), max_unavailable=b.get("maxUnavailable"))

    generation = Generation(
        max_tokens=value_of(raw, "generation.maxTokens"),
        temperature=value_of(raw, "generation.temperature"),
        top_p=value_of(raw, "generation.topP"),
    )
    return Phi3ModelSpec(
        model=model,
        hardware=hardware,
        image=image,
        replicas=value_of(raw, "replicas"),
        autoscaling=autoscaling,
        disruption_budget=budget,
        resources=dict(raw.get("resources") or {}),
        generation=generation,
        service=ServiceSpec(type=value_of(raw, "service.type"), port=value_of(raw, "service.port")),
        serving=Serving(max_batch_size=value_of(raw, "serving.maxBatchSize"),
                        max_request_bytes=value_of(raw, "serving.maxRequestBytes"),
                        max_queued_requests=value_of(raw, "serving.maxQueuedRequests"),
                        cpu_threads=value_of(raw, "serving.cpuThreads")),
        auth=_auth(raw),
        network=_network(raw),
    )


def _auth(raw: Mapping[str, Any]) -> Auth | None:
    secret = _at(raw, "auth.apiKeySecretRef.name")
    if secret is None:
        return None
    if not isinstance(secret, str) or not secret:
        raise SpecError("spec.auth.apiKeySecretRef.name must name a Secret")
    return Auth(api_key_secret=secret)


def _network(raw: Mapping[str, Any]) -> Network | None:
    network = raw.get("network")
    if network is None:
        return None
    peers = []
    for peer in network.get("allowFrom") or ():
        peers.append(NetworkPeer(namespace_selector=peer.get("namespaceSelector"),
                                 pod_selector=peer.get("podSelector")))
    return Network(allow_from=tuple(peers))
