"""Conditions and status, following the Kubernetes API conventions (and so kstatus, Flux, Argo CD).

`REASONS` is the one table of condition reasons. It decides the phase, kstatus's `Reconciling` and
`Stalled` conditions, the Argo CD health check (charts/phi3-operator/argocd/health.lua) and the
README's troubleshooting table; tests/unit/test_reasons.py holds the last two to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

ConditionStatus = Literal["True", "False", "Unknown"]
CONDITION_TYPES = ("ModelResolved", "ImageReady", "ModelDelivered", "Available", "ElasticServing", "Ready",
                   "Reconciling", "Stalled")
# Said, not judged: they explain how the model is served, but a model served otherwise is still Ready.
ADVISORY_CONDITIONS = ("ElasticServing",)
# What a pass learned before the Deployment: kept as they are when only the rollout moved.
PRE_DEPLOYMENT_CONDITIONS = ("ModelResolved", "ImageReady", "ModelDelivered")

# ok: all is well. progressing: planned work under way. transient: a failure that is retried with
# backoff and may clear by itself. terminal: a failure that waiting will not fix; a person must act.
ReasonKind = Literal["ok", "progressing", "transient", "terminal"]


@dataclass(frozen=True)
class Reason:
    name: str
    condition: str  # the condition type that carries it; "Ready" for failures of the reconcile itself
    kind: ReasonKind
    phase: str
    help: str = ""  # cause and fix, for the README's troubleshooting table


REASON_TABLE: tuple[Reason, ...] = (
    Reason("Resolved", "ModelResolved", "ok", "Ready"),
    Reason("InvalidSpec", "ModelResolved", "terminal", "Failed",
           "a spec the CRD let through but the operator cannot act on (an old CRD?): "
           "`kubectl apply --server-side -f crds/`, then fix the field the message names"),
    Reason("MLflowUnavailable", "ModelResolved", "transient", "Pending",
           "the tracking server is down, unreachable from the operator or answered 5xx; retried with backoff, "
           "and the last resolved version keeps serving"),
    Reason("MLflowAccessDenied", "ModelResolved", "terminal", "Failed",
           "MLflow refused the credentials (HTTP 401/403): fix the Secret in `model.credentialsSecretRef`; "
           "it is tried again every model refresh interval"),
    Reason("CredentialsUnavailable", "ModelResolved", "terminal", "Failed",
           "the Secret in `model.credentialsSecretRef` does not exist in the model's namespace, or the "
           "operator may not read it"),
    Reason("ModelNotFound", "ModelResolved", "terminal", "Failed",
           "the name, version or alias does not exist in that registry: `mlflow models` / the MLflow UI"),
    Reason("InvalidModel", "ModelResolved", "terminal", "Failed",
           "the URI points at something without an `MLmodel` file, or one the operator cannot read"),
    Reason("Catalog", "ImageReady", "ok", "Ready"),
    Reason("Override", "ImageReady", "ok", "Ready"),
    Reason("Built", "ImageReady", "ok", "Ready"),
    Reason("Building", "ImageReady", "progressing", "Building",
           "an image with the model's requirements is being built by a Job; the old Deployment keeps serving"),
    Reason("NoCompatibleImage", "ImageReady", "terminal", "Failed",
           "the model needs packages no catalog image has and `image.policy` is Prebuilt: set "
           "`image.override`, extend the chart's `config.imageCatalog`, or allow a build"),
    Reason("RegistryRequired", "ImageReady", "terminal", "Failed",
           "the model needs a build but `image.registry` is empty: set it (and `image.pushSecretRef`)"),
    Reason("BuildFailed", "ImageReady", "terminal", "Failed",
           "the build Job failed: `kubectl logs job/<name>` (the message names it); delete the Job to retry"),
    Reason("Published", "ModelDelivered", "ok", "Ready"),
    Reason("PerPodDownload", "ModelDelivered", "ok", "Ready"),
    Reason("Publishing", "ModelDelivered", "progressing", "Deploying",
           "a Job publishes the model version to the model registry as an image (once per version); the old "
           "Deployment keeps serving"),
    Reason("ModelRegistryRequired", "ModelDelivered", "terminal", "Failed",
           "`model.delivery: ImageVolume` needs a registry: set the chart's `config.modelRegistry` or the "
           "model's `image.registry`, or use `Auto`"),
    Reason("PublishFailed", "ModelDelivered", "terminal", "Failed",
           "the publish Job could not push the model image (the message quotes it): registry address, "
           "`config.plainHttpRegistries`, `image.pushSecretRef`; delete the Job `phi3-publish-*` to retry. "
           "With `Auto` the pods download the model instead"),
    Reason("ModelUnavailable", "ModelDelivered", "terminal", "Failed",
           "the model's files cannot be fetched from MLflow (the message quotes why): the version's artifacts "
           "were deleted, or the artifact store refuses; what serves keeps serving. Delete the Job "
           "`phi3-publish-*` to retry"),
    Reason("MinimumReplicasAvailable", "Available", "ok", "Ready"),
    Reason("ScaledToZero", "Available", "ok", "Ready"),
    Reason("DeploymentMissing", "Available", "progressing", "Deploying",
           "the Deployment is not there yet (or was deleted by hand); the next reconcile creates it"),
    Reason("RolloutInProgress", "Available", "progressing", "Deploying",
           "pods are starting or being replaced; the message counts available replicas"),
    Reason("ProgressDeadlineExceeded", "Available", "terminal", "Failed",
           "the rollout stalled (image pull, crash loop, no node fits): `kubectl describe deployment <name>` "
           "and the pods' events"),
    Reason("OOMKilled", "Available", "terminal", "Failed",
           "a container was killed at its memory limit (the message names it): raise "
           "`resources.limits.memory`; the model's weights, KV cache and runtime must fit"),
    Reason("ModelFetchFailed", "Available", "transient", "Pending",
           "the init container could not download the model (the message quotes its error): MLflow "
           "unreachable from the pod, credentials, or the version's artifacts were deleted"),
    Reason("ImagePullFailed", "Available", "transient", "Pending",
           "the node cannot pull the runtime image: check the catalog's image reference, the registry and "
           "`imagePullSecrets`"),
    Reason("ModelLoadFailed", "Available", "terminal", "Failed",
           "the model's own code raised while loading (`load_context`, a missing package or file); the message "
           "quotes the error's last line. A serving version keeps serving: the rollout stalls"),
    Reason("ApiKeysUnavailable", "Available", "terminal", "Failed",
           "the Secret in `auth.apiKeySecretRef` does not exist, holds no key, or the operator may not read it: "
           "nothing new is rolled out until it does (looked at every model refresh interval)"),
    Reason("RuntimeCrashLoop", "Available", "terminal", "Failed",
           "the runtime container keeps exiting (the message quotes its last words): "
           "`kubectl logs deploy/<name> -c runtime --previous`"),
    Reason("RevisionFailed", "Available", "terminal", "Failed",
           "Knative Serving refused or could not run the model's Revision (the message quotes it): "
           "`kubectl describe revision <name>`; the Revision that served before keeps serving"),
    Reason("Knative", "ElasticServing", "ok", "Ready"),
    Reason("KnativeMissing", "ElasticServing", "ok", "Ready"),
    Reason("Ready", "Ready", "ok", "Ready"),
    Reason("ReconcileError", "Ready", "transient", "Pending",
           "the reconcile raised an unexpected error (the message names it, e.g. a malformed MLflow answer); "
           "retried with backoff; the operator log has the traceback"),
    Reason("KubernetesApiError", "Ready", "transient", "Pending",
           "the API server refused or failed a request (throttling, timeout, conflict, 5xx); retried with backoff"),
    Reason("PermissionDenied", "Ready", "terminal", "Failed",
           "the operator's RBAC lacks a verb; the message names the verb and resource: reinstall the chart "
           "or restore its ClusterRole"),
    Reason("ChildRejected", "Ready", "terminal", "Failed",
           "the API server rejected an object built from the spec (e.g. a malformed resource quantity or "
           "label): fix the field the message quotes"),
)
REASONS: Mapping[str, Reason] = {reason.name: reason for reason in REASON_TABLE}
TERMINAL_REASONS = frozenset(r.name for r in REASON_TABLE if r.kind == "terminal")


def reason_kind(reason: str) -> ReasonKind:
    """A reason missing from the table is treated as work in progress, never as success."""
    known = REASONS.get(reason)
    return known.kind if known is not None else "progressing"


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
    delivery: Mapping[str, Any] = field(default_factory=dict)
    # The reconcile itself failed: Ready carries this instead of the conjunction of the others.
    failure: Condition | None = None
    # Scaled to zero by its autoscaler, since then (RFC 3339).
    idle_since: str = ""


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


def _failing(conditions: Sequence[Condition]) -> list[Condition]:
    """The conditions that are not True, a terminal one first: it is what a person must act on."""
    failing = [c for c in conditions if c.status != "True"]
    return sorted(failing, key=lambda c: reason_kind(c.reason) != "terminal")


def ready_condition(conditions: Sequence[Condition]) -> Condition:
    """Ready is the conjunction of the others; its reason is a terminal failure's, else the first not True."""
    failing = _failing(conditions)
    if failing:
        return Condition("Ready", "False", failing[0].reason, failing[0].message)
    return Condition("Ready", "True", "Ready", "The model is served and all replicas are ready")


def phase_of(conditions: Sequence[Condition]) -> str:
    failing = _failing(conditions)
    if not failing:
        return "Ready"
    known = REASONS.get(failing[0].reason)
    if known is None or known.kind == "ok":
        return "Deploying"
    return known.phase


def kstatus_conditions(conditions: Sequence[Condition]) -> list[Condition]:
    """kstatus's abnormal-true pair: Stalled for a terminal failure, Reconciling for anything else
    not yet Ready. Flux and cli-utils read Failed, InProgress and Current from these."""
    failing = _failing(conditions)
    if not failing:
        return [Condition("Reconciling", "False", "Ready", ""), Condition("Stalled", "False", "Ready", "")]
    first = failing[0]
    stalled = reason_kind(first.reason) == "terminal"
    return [
        Condition("Reconciling", "False" if stalled else "True", first.reason, "" if stalled else first.message),
        Condition("Stalled", "True" if stalled else "False", first.reason, first.message if stalled else ""),
    ]


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
    total = int(status.get("replicas", 0))
    # As `kubectl rollout status` judges it: every replica is of the new template and enough of them are
    # available. A crash-looping new pod counts as updated, while the old pod is what is available.
    if updated >= desired and total <= updated and available >= desired:
        return Condition("Available", "True", "MinimumReplicasAvailable",
                         f"{available}/{desired} replicas are available"), desired, ready
    for cond in status.get("conditions", []):
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return Condition("Available", "False", "ProgressDeadlineExceeded", cond.get("message", "")), desired, ready
    return in_progress, desired, ready


def _condition(obj: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any]:
    conditions = (obj or {}).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c.get("type") == type_), {})


def revision_available(configuration: Mapping[str, Any] | None, revision: Mapping[str, Any] | None,
                       ) -> tuple[Condition, int, int, str]:
    """Available, (desired, ready) replicas and since when it idles ("" if it does not), read from the
    Configuration's newest Revision (Knative Serving). A Revision at zero is Ready and not Active."""
    if configuration is None:
        return Condition("Available", "False", "DeploymentMissing", "The Configuration does not exist yet"), 0, 0, ""
    current = configuration.get("status", {}).get("observedGeneration", 0) >= configuration.get(
        "metadata", {}).get("generation", 0)
    if not current or revision is None:
        return Condition("Available", "False", "RolloutInProgress", "waiting for Knative to create the Revision"
                         ), 0, 0, ""
    status = revision.get("status", {})
    desired, actual = int(status.get("desiredReplicas", 0) or 0), int(status.get("actualReplicas", 0) or 0)
    name = revision["metadata"]["name"]
    ready, active = _condition(revision, "Ready"), _condition(revision, "Active")
    if ready.get("status") == "False":
        message = f"Revision {name}: {ready.get('reason', '')}: {ready.get('message', '')}"
        return Condition("Available", "False", "RevisionFailed", message), desired, actual, ""
    if ready.get("status") != "True":
        return Condition("Available", "False", "RolloutInProgress",
                         f"Revision {name} is starting: {actual}/{max(desired, 1)} pods ready"), desired, actual, ""
    if active.get("status") == "False" and actual == 0:
        since = str(active.get("lastTransitionTime", ""))
        return Condition("Available", "True", "ScaledToZero",
                         f"Revision {name} is scaled to zero (no requests since {since or 'a while'}); the next "
                         "request wakes it and is held until a pod is Ready"), 0, 0, since
    return Condition("Available", "True", "MinimumReplicasAvailable",
                     f"Revision {name}: {actual} pods ready"), desired, actual, ""


def build_status(current: Mapping[str, Any], observed: ObservedState, now: str) -> dict[str, Any]:
    advisory = [c for c in observed.conditions if c.type in ADVISORY_CONDITIONS]
    served = [c for c in observed.conditions if c.type not in ADVISORY_CONDITIONS]
    ready = observed.failure or ready_condition(served)
    judged = [*served, ready]
    conditions = [*served, *advisory, ready, *kstatus_conditions(judged)]
    status: dict[str, Any] = {
        "observedGeneration": observed.generation,
        "phase": phase_of(judged),
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
    if observed.delivery:
        status["delivery"] = dict(observed.delivery)
    if observed.idle_since:
        status["idleSince"] = observed.idle_since
    return status


def failure_status(current: Mapping[str, Any], generation: int, failure: Condition, now: str) -> dict[str, Any]:
    """The status after a reconcile that failed part-way: what was last known stays, Ready and the
    kstatus pair carry the failure. observedGeneration moves on, so that kstatus reads the failure
    (Stalled) rather than a generation not yet observed."""
    kept = [
        Condition(c["type"], c["status"], c.get("reason", ""), c.get("message", ""))
        for c in current.get("conditions", [])
        if c.get("type") in (*PRE_DEPLOYMENT_CONDITIONS, "Available", *ADVISORY_CONDITIONS)
    ]
    observed = ObservedState(
        generation=generation,
        conditions=kept,
        model=current.get("model") or {},
        image=str(current.get("image", "")),
        endpoint=current.get("endpoint") or {},
        replicas=int(current.get("replicas", 0)),
        ready_replicas=int(current.get("readyReplicas", 0)),
        delivery=current.get("delivery") or {},
        failure=failure,
        idle_since=str(current.get("idleSince", "")),
    )
    return build_status(current, observed, now)


def status_changed(current: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """True when writing `new` would change anything a reader sees (kopf's own keys aside)."""
    return any(current.get(key) != value for key, value in new.items())


def endpoint_urls(name: str, namespace: str, port: int, api_key_secret: str | None = None, base: str = ""
                  ) -> dict[str, str]:
    """The model's URLs, at its Service (`base` where something else serves it: a Knative Revision)."""
    base = base or f"http://{name}.{namespace}.svc:{port}"
    urls = {
        "url": base,
        "chatCompletions": f"{base}/v1/chat/completions",
        "v2Infer": f"{base}/v2/models/{name}/infer",
        "invocations": f"{base}/invocations",
    }
    if api_key_secret:
        # Names where the keys are, never a key.
        urls["authorization"] = f"Bearer: a key from Secret {namespace}/{api_key_secret}"
    return urls
