"""One level-based reconcile for a Phi3Model, for every reaction: model events, Deployment events, resync.

Like controller-runtime's Reconcile, a pass returns when to look again for planned waits (a running
build, a model serving its last version while MLflow is away) and raises for failures; only failures
back off. Every failure is written to the status first, so it is visible as a condition.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from phi3_operator.builders import BuildContext, Owner, build_children
from phi3_operator.builders.build import BuildRequest, build_context_configmap, build_job, job_outcome
from phi3_operator.builders.common import API_VERSION, KIND
from phi3_operator.builders.delivery import PublishRequest, choose_delivery, publish_job, publish_outcome
from phi3_operator.builders.knative import KNATIVE_API_VERSION, revision_url
from phi3_operator.images import ImageDecision, NoCompatibleImage, onnx_variant, requirements_named, select_image
from phi3_operator.k8s import KubeApi, KubeError, ObjectKey, emit_event
from phi3_operator.metrics import Metrics
from phi3_operator.podhealth import newest_ready_pod, pod_problem, rollout_stuck, start_phases
from phi3_operator.resolve import ResolvedModel, ResolveError, Resolver
from phi3_operator.settings import OperatorSettings
from phi3_operator.spec import Phi3ModelSpec, SpecError, parse_spec
from phi3_operator.status import (
    PRE_DEPLOYMENT_CONDITIONS,
    REASONS,
    Condition,
    ObservedState,
    build_status,
    deployment_available,
    endpoint_urls,
    failure_status,
    now_rfc3339,
    revision_available,
    status_changed,
)
from phi3_operator.workqueue import Retry

logger = logging.getLogger(__name__)

BUILD_POLL_S = 10.0
OPTIONAL_CHILDREN = (("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget"),
                     ("networking.k8s.io/v1", "NetworkPolicy"))
# What serves a model, one way or the other: the way no longer wanted goes once the other is available.
SERVING_CHILDREN = (("apps/v1", "Deployment"), ("v1", "Service"), (KNATIVE_API_VERSION, "Configuration"))
# Knative's objects are not watched: a model it serves is looked at this often, so that its status
# follows the Revision as it scales (to zero and back).
ELASTIC_POLL_S = 15.0
# Whether Knative Serving is installed is asked again this often: it may be installed after the operator.
KNATIVE_RECHECK_S = 60.0


ModelKey = tuple[str, str]  # (namespace, name)
API_ERROR_RETRY_S = 60.0
MESSAGE_LIMIT = 512
URL_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def plain(value: Any) -> Any:
    """A deep copy as dicts and lists: kopf hands out live views; reconcile wants plain, comparable data."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def slim_model(body: Mapping[str, Any]) -> dict[str, Any]:
    """What reconcile reads of a Phi3Model. Queued work holds this, not the object's managed fields
    and annotations: a thousand waiting models then cost little memory."""
    meta = body["metadata"]
    keep = ("name", "namespace", "uid", "generation", "deletionTimestamp")
    return {
        "metadata": {k: meta[k] for k in keep if k in meta},
        "spec": plain(body.get("spec") or {}),
        "status": plain(body.get("status") or {}),
    }


def slim_deployment(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """What observe_deployment reads of a Deployment."""
    meta = deployment["metadata"]
    return {
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "generation": meta.get("generation", 0),
            "ownerReferences": [{"kind": r.get("kind"), "uid": r.get("uid")} for r in meta.get("ownerReferences", [])],
        },
        "spec": {"replicas": (deployment.get("spec") or {}).get("replicas", 1)},
        "status": plain(deployment.get("status") or {}),
    }


@dataclass(frozen=True)
class ModelChanged:
    """Reconcile the model in full, from `body` (slim), or from a fresh read when it is None."""

    body: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class DeploymentChanged:
    """The model's Deployment moved: fold its rollout progress into the model's status."""

    deployment: Mapping[str, Any]


Work = ModelChanged | DeploymentChanged


def merge_work(waiting: Work, new: Work) -> Work:
    """Two pieces of work for one model that has not been worked on yet become one."""
    if isinstance(waiting, ModelChanged) and isinstance(new, DeploymentChanged):
        return waiting  # a full reconcile reads the Deployment too
    return new


@dataclass(frozen=True)
class Outcome:
    """A pass that did what it could: done, or look again after `requeue_after` seconds (a planned
    wait, not a failure: no backoff)."""

    requeue_after: float | None = None
    message: str = ""


class ReconcileFailed(Retry):
    """The pass failed and its status says so; retry with backoff, at most `ceiling_s` apart."""


def secret_free(message: str, secrets: Iterable[str] = ()) -> str:
    """A message fit for a condition and an Event: no userinfo in URLs, no credential value, bounded."""
    message = URL_USERINFO.sub(r"\1***@", message)
    for value in secrets:
        if len(value) >= 4:  # shorter values would blank out ordinary words
            message = message.replace(value, "***")
    return message if len(message) <= MESSAGE_LIMIT else message[: MESSAGE_LIMIT - 3] + "..."


def api_failure(error: KubeError) -> Condition:
    """The Ready condition for an API request that failed; the API server's message names the verb and
    resource (for 403) or the field (for 422)."""
    if error.status == 403:
        return Condition("Ready", "False", "PermissionDenied", f"forbidden: {error.message}")
    if error.status in (400, 422):
        return Condition("Ready", "False", "ChildRejected", f"{error.status} {error.reason}: {error.message}")
    return Condition("Ready", "False", "KubernetesApiError", f"{error.status} {error.reason}: {error.message}")


@dataclass
class Reconciler:
    api: KubeApi
    settings: OperatorSettings
    resolver: Resolver
    clock: Callable[[], str] = now_rfc3339
    metrics: Metrics = field(default_factory=Metrics)
    # The status this operator last wrote, per object uid. Reactions queued before that write
    # carry an older body; reconciling from the stale status would repeat the write and its Event.
    _written_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    _optional_children: set[tuple[str, str]] = field(default_factory=set)
    _pruned: set[str] = field(default_factory=set)
    _server_minor: list[int | None] = field(default_factory=list)  # asked once per process
    _knative_seen: list[tuple[float, bool]] = field(default_factory=list)  # (when asked, installed)
    # Per model uid: the children it had when the other way of serving was last looked for.
    _serving_pruned: dict[str, frozenset[tuple[str, str]]] = field(default_factory=dict)

    def server_minor(self) -> int | None:
        if not self._server_minor:
            self._server_minor.append(self.api.server_minor())
        return self._server_minor[0]

    def knative_installed(self) -> bool:
        now = time.monotonic()
        if not self._knative_seen or now - self._knative_seen[0][0] > KNATIVE_RECHECK_S:
            try:
                self._knative_seen[:] = [(now, self.api.serves(KNATIVE_API_VERSION, "Configuration"))]
            except KubeError:
                # A failed discovery read must not flip a model between Knative and a Deployment: keep
                # the last answer (and raise, for a retry, when there is none yet).
                if not self._knative_seen:
                    raise
                logger.warning("could not ask whether Knative Serving is installed; still assuming %s",
                               self._knative_seen[0][1])
        return self._knative_seen[0][1]

    def forget(self, uid: str) -> None:
        self._written_status.pop(uid, None)
        self._pruned.discard(uid)
        self._serving_pruned.pop(uid, None)
        self._optional_children = {(u, kind) for u, kind in self._optional_children if u != uid}

    def needs_reconcile(self, body: Mapping[str, Any]) -> bool:
        """False when this process has already written status for the model's current generation:
        then the event is our own status write, or a change of labels or annotations only."""
        meta = body["metadata"]
        written = self._written_status.get(meta["uid"])
        return written is None or written.get("observedGeneration") != meta.get("generation")

    def observe_deployment(self, deployment: Mapping[str, Any]) -> bool:
        """Fold a Deployment's rollout progress into its owner's status without a full reconcile.

        Returns False when the owner's status is not known to this process; the caller then
        reconciles in full.
        """
        meta = deployment["metadata"]
        owners = [ref["uid"] for ref in meta.get("ownerReferences", []) if ref.get("kind") == KIND]
        if not owners:
            return True
        written = self._written_status.get(owners[0])
        if written is None or not _reconciled_cleanly(written):
            return False
        available, replicas, ready = self.serving_condition(deployment)
        key = ObjectKey(API_VERSION, KIND, meta["namespace"], meta["name"])
        delivery = self.note_start(key, owners[0], available, deployment, written.get("delivery", {}))
        kept = [
            Condition(c["type"], c["status"], c["reason"], c["message"])
            for c in written.get("conditions", [])
            if c["type"] in PRE_DEPLOYMENT_CONDITIONS
        ]
        observed = ObservedState(
            generation=int(written.get("observedGeneration", 1)),
            conditions=[*kept, available],
            model=written.get("model", {}),
            image=str(written.get("image", "")),
            endpoint=written.get("endpoint", {}),
            replicas=replicas,
            ready_replicas=ready,
            delivery=delivery,
        )
        self.record_status(key, owners[0], written, build_status(written, observed, self.clock()))
        return True

    def serving_condition(self, deployment: Mapping[str, Any] | None) -> tuple[Condition, int, int]:
        """The Deployment's Available condition; while its pods do not come up, their status says why
        (OOMKilled at a limit, a failed fetch, an image pull): a person sees the cause, not only 0/1."""
        available, replicas, ready = deployment_available(deployment)
        if deployment is None or available.reason != "RolloutInProgress" or not rollout_stuck(deployment, self.clock()):
            return available, replicas, ready
        selector = deployment.get("spec", {}).get("selector", {}).get("matchLabels", {})
        problem = pod_problem(self.api.list_pods(deployment["metadata"]["namespace"], selector))
        if problem is None:
            return available, replicas, ready
        unavailable = Condition("Available", "False", problem.reason, f"pod {problem.pod}: {problem.message}")
        return unavailable, replicas, ready

    def note_start(self, key: ObjectKey, uid: str, available: Condition, deployment: Mapping[str, Any] | None,
                   delivery: Mapping[str, Any]) -> dict[str, Any]:
        """When a rollout has completed: how long its newest pod took to be Ready, as a Normal Event and in
        status.delivery.lastStartSeconds. One pod list per Deployment generation that became available (an
        alias rollout keeps Available True throughout, so a flip of Available would miss it)."""
        generation = (deployment or {}).get("metadata", {}).get("generation")
        if (deployment is None or available.status != "True" or available.reason == "ScaledToZero"
                or delivery.get("rolloutGeneration") == generation):
            return dict(delivery)
        selector = deployment.get("spec", {}).get("selector", {}).get("matchLabels", {})
        pod = newest_ready_pod(self.api.list_pods(key.namespace, selector))
        if pod is None:
            return dict(delivery)
        phases = start_phases(pod)
        steps = ", ".join(f"{name.replace('_', ' ')} +{phases[name]:.0f}s"
                          for name in ("scheduled", "fetched", "runtime_started") if name in phases)
        mode = delivery.get("mode", "Download")
        emit_event(self.api, key, uid=uid, event_type="Normal", reason="PodReady", now=self.clock(),
                   message=f"pod {pod['metadata'].get('name')} was Ready {phases['ready']:.0f}s after it was "
                           f"created ({steps}); model delivery: {mode}")
        return {**delivery, "lastStartSeconds": phases["ready"], "rolloutGeneration": generation}

    def record_status(self, key: ObjectKey, uid: str, current: Mapping[str, Any], status: dict[str, Any]) -> None:
        """Write `status` where it differs from `current`, and remember it either way: when nothing
        was written the object already holds it (after a restart, say)."""
        if status_changed(current, status):
            self.api.patch_status(key, status)
        self._written_status[uid] = status

    def handle(self, key: ModelKey, work: Work) -> float | None:
        """One item of queued work: None when done, else seconds until a planned look again.

        Raises (a Retry, or whatever the pass raised) when the work failed: the queue backs off.
        """
        namespace, name = key
        try:
            if isinstance(work, DeploymentChanged):
                if self.observe_deployment(work.deployment):
                    return None
                work = ModelChanged()
            outcome = self.reconcile(work.body) if work.body is not None else self.reconcile_by_name(namespace, name)
        except KubeError as error:  # outside a pass (reading the model, folding in a rollout): no status to write
            raise Retry(str(error), ceiling_s=API_ERROR_RETRY_S) from error
        if outcome.requeue_after is not None:
            logger.info("%s/%s: looking again in %.0fs: %s", namespace, name, outcome.requeue_after, outcome.message)
        return outcome.requeue_after

    def reconcile_by_name(self, namespace: str, name: str) -> Outcome:
        body = self.api.get(ObjectKey(API_VERSION, KIND, namespace, name))
        if body is None or body["metadata"].get("deletionTimestamp"):
            return Outcome()
        return self.reconcile(body)

    def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        """One pass over one model. The work queue guarantees no two passes for one model at once."""
        try:
            outcome = _Pass(self, body).run()
        except Exception:
            self.metrics.reconciled("error")
            raise
        self.metrics.reconciled("ok" if outcome.requeue_after is None else "requeue")
        return outcome


def elastic_condition(spec: Phi3ModelSpec, elastic: bool) -> Condition:
    autoscaling = spec.autoscaling
    assert autoscaling is not None
    if elastic:
        return Condition("ElasticServing", "True", "Knative",
                         f"Knative Serving scales it on requests in flight: {autoscaling.target_requests_per_replica} "
                         f"per pod, {autoscaling.min_replicas} to {autoscaling.max_replicas} pods, one removed "
                         f"after {autoscaling.scale_down_delay_s}s of lower load")
    low = max(1, autoscaling.min_replicas)
    return Condition("ElasticServing", "False", "KnativeMissing",
                     "autoscaling on RequestsPerReplica, and minReplicas: 0 with requests held while a pod starts, "
                     "need Knative Serving (serving.knative.dev/v1) in the cluster; until it is installed an HPA "
                     f"scales the Deployment on CPU, {low} to {autoscaling.max_replicas} pods")


def keep_start(delivery: Mapping[str, Any], previous: Mapping[str, Any]) -> dict[str, Any]:
    """The last measured start stays in the status while the pods get their model the same way."""
    same = all(delivery.get(k) == previous.get(k) for k in ("mode", "image"))
    kept = {k: previous[k] for k in ("lastStartSeconds", "rolloutGeneration") if k in previous} if same else {}
    return {**delivery, **kept}


def _reconciled_cleanly(status: Mapping[str, Any]) -> bool:
    """False when the last pass failed part-way (Ready carries a failure of the pass itself):
    then only a full reconcile may clear it, not a Deployment's progress."""
    for condition in status.get("conditions", []):
        if condition.get("type") == "Ready" and condition.get("status") != "True":
            known = REASONS.get(str(condition.get("reason")))
            return known is None or known.condition != "Ready"
    return True


class _Pass:
    """One reconcile pass over one object; holds what the pass has learned so far."""

    def __init__(self, reconciler: Reconciler, body: Mapping[str, Any]) -> None:
        self.r = reconciler
        meta = body["metadata"]
        self.owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        self.key = ObjectKey(API_VERSION, KIND, meta["namespace"], meta["name"])
        self.generation = int(meta.get("generation", 1))
        self.raw_spec = body.get("spec") or {}
        self.current_status: Mapping[str, Any] = reconciler._written_status.get(meta["uid"]) or body.get("status") or {}
        self.now = reconciler.clock()
        self.secrets: tuple[str, ...] = ()  # credential values, kept out of every message

    def event(self, event_type: str, reason: str, message: str) -> None:
        logger.info("%s/%s: %s: %s", self.owner.namespace, self.owner.name, reason, message)
        emit_event(self.r.api, self.key, uid=self.owner.uid, event_type=event_type, reason=reason, message=message,
                   now=self.now)

    def write_status(self, observed: ObservedState) -> None:
        self.r.record_status(self.key, self.owner.uid, self.current_status,
                             build_status(self.current_status, observed, self.now))

    def warn_once(self, failing: Condition) -> None:
        """A Warning Event when this failure is new: not one per retry of the same failure."""
        previously = {c.get("type"): c for c in self.current_status.get("conditions", [])}
        before = previously.get(failing.type, {})
        if before.get("reason") != failing.reason or before.get("status") != failing.status:
            self.event("Warning", failing.reason, failing.message)

    def fail(self, conditions: list[Condition], **extra: Any) -> Condition:
        """Write a status in which a condition failed; returns the failing one."""
        self.write_status(ObservedState(generation=self.generation, conditions=conditions, **extra))
        failing = next(c for c in conditions if c.status != "True")
        if failing.reason not in ("Building", "Publishing"):  # a start has its own Normal event
            self.warn_once(failing)
        return failing

    def run(self) -> Outcome:
        """The pass; a failure that is not a condition yet (an API error, an unexpected exception)
        becomes one on Ready, with one Warning Event, and is raised on for the queue to back off."""
        try:
            return self.steps()
        except ReconcileFailed:
            raise
        except KubeError as error:
            failure, ceiling = api_failure(error), API_ERROR_RETRY_S
            logger.warning("%s/%s: %s", self.owner.namespace, self.owner.name, error)
            cause: Exception = error
        except Exception as error:  # a malformed MLflow answer, a bug: visible, then retried
            message = f"reconcile failed: {type(error).__name__}: {error}"
            failure = Condition("Ready", "False", "ReconcileError", message)
            ceiling = self.r.settings.model_refresh_interval_s
            cause = error
            if self.new_failure(failure):  # the traceback once, not once per retry
                logger.exception("%s/%s: reconcile failed", self.owner.namespace, self.owner.name)
        failure = Condition(failure.type, failure.status, failure.reason, secret_free(failure.message, self.secrets))
        self.report(failure)
        raise ReconcileFailed(failure.message, ceiling_s=ceiling) from cause

    def new_failure(self, failure: Condition) -> bool:
        ready = {c.get("type"): c for c in self.current_status.get("conditions", [])}.get("Ready", {})
        return bool(ready.get("reason") != failure.reason)

    def report(self, failure: Condition) -> None:
        """Put a failure of the pass on the status, keeping what was last known; when even that
        write fails, the log is all that is left."""
        try:
            self.r.record_status(self.key, self.owner.uid, self.current_status,
                                 failure_status(self.current_status, self.generation, failure, self.now))
        except KubeError as error:
            logger.warning("%s/%s: could not record %s in the status: %s", self.owner.namespace, self.owner.name,
                           failure.reason, error)
            return
        self.warn_once(failure)

    def steps(self) -> Outcome:
        try:
            spec = parse_spec(self.raw_spec)
        except SpecError as error:
            failing = self.fail([Condition("ModelResolved", "False", "InvalidSpec", str(error))])
            return Outcome(message=failing.message)  # terminal: a spec change brings it back

        tracking_uri = spec.model.tracking_uri or self.r.settings.default_tracking_uri
        conditions: list[Condition] = []
        refresh_s = self.r.settings.model_refresh_interval_s
        try:
            credentials = self.credentials(spec)
            self.secrets = tuple(credentials.values())
            model = self.r.resolver.resolve(tracking_uri, spec.model.uri, credentials)
            conditions.append(Condition("ModelResolved", "True", "Resolved", f"{spec.model.uri} is {model.uri}"))
        except ResolveError as error:
            previous = self.current_status.get("model") or {}
            message = secret_free(error.message, self.secrets)
            if not previous.get("resolvedUri") or previous.get("requestedUri") != spec.model.uri:
                failing = self.fail([Condition("ModelResolved", "False", error.reason, message)])
                if error.retryable:  # nothing serves yet: a failure, so back off
                    raise ReconcileFailed(failing.message, ceiling_s=refresh_s) from None
                return Outcome(message=failing.message)
            # An outage never tears down what serves: keep the last resolved version.
            model = ResolvedModel.from_status(previous)
            conditions.append(
                Condition("ModelResolved", "False", error.reason, f"{message}; still serving {model.uri}")
            )

        # Announced when first resolved: a build or a publish may hold the rollout for a while after.
        self.announce_version(model)
        try:
            decision = select_image(spec, model, self.r.settings)
        except NoCompatibleImage as error:
            failing = self.fail(
                [*conditions, Condition("ImageReady", "False", "NoCompatibleImage", error.message)],
                model=model.as_status(spec.model.uri),
            )
            return Outcome(message=failing.message)
        image = decision.image
        if decision.source == "Build":
            built, image_condition, retry_after = self.ensure_build(spec, model, decision)
            if built is None:
                return self.hold_for_build(conditions, image_condition, retry_after, model.as_status(spec.model.uri))
            image = built
            conditions.append(image_condition)
        else:
            conditions.append(Condition("ImageReady", "True", decision.source, f"using {decision.image}"))

        elastic = spec.autoscaling is not None and spec.autoscaling.on_requests and self.r.knative_installed()
        delivery, delivered, retry_after = self.deliver(spec, model, image, tracking_uri, elastic)
        if delivery is None:
            return self.hold_for_build(conditions, delivered, retry_after, model.as_status(spec.model.uri))
        conditions.append(delivered)

        if (problem := self.api_keys_problem(spec)) is not None:
            live = self.r.api.get(ObjectKey("apps/v1", "Deployment", self.owner.namespace, self.owner.name))
            _, replicas, ready = self.r.serving_condition(live)
            if live is not None:
                problem += "; the running pods keep the keys they have"
            failing = self.fail([*conditions, Condition("Available", "False", "ApiKeysUnavailable", problem)],
                                model=model.as_status(spec.model.uri), image=image, replicas=replicas,
                                ready_replicas=ready)
            # Secrets are not watched: look again each refresh interval.
            return Outcome(requeue_after=refresh_s, message=failing.message)

        ctx = BuildContext(
            owner=self.owner,
            spec=spec,
            image=image,
            model_uri=model.uri,
            tracking_uri=tracking_uri,
            onnx_variant=onnx_variant(spec.hardware.target, model.variants),
            model_image=str(delivery.get("image", "")),
            model_size_bytes=int(delivery.get("sizeBytes", 0)),
            monitoring_peers=self.r.settings.monitoring_peers,
            knative=elastic,
        )
        serving, children = self.apply_children(ctx)
        api_key_secret = spec.auth.api_key_secret if spec.auth else None
        idle_since = ""
        if ctx.elastic:
            revision = self.newest_revision(serving)
            available, replicas, ready, idle_since = revision_available(serving, revision)
            # The Revision that answers now; a new one's URL once it is Ready.
            answering = (serving or {}).get("status", {}).get("latestReadyRevisionName") or (
                revision["metadata"]["name"] if revision else "")
            endpoint = endpoint_urls(self.owner.name, self.owner.namespace, spec.service.port, api_key_secret,
                                     revision_url(answering, self.owner.namespace)) if answering else {}
        else:
            available, replicas, ready = self.r.serving_condition(serving)
            endpoint = endpoint_urls(self.owner.name, self.owner.namespace, spec.service.port, api_key_secret)
            delivery = self.r.note_start(self.key, self.owner.uid, available, serving,
                                         keep_start(delivery, self.current_status.get("delivery") or {}))
        conditions.append(available)
        if available.status == "True":
            self.prune_serving_children(children)
        if spec.autoscaling is not None and spec.autoscaling.on_requests:
            conditions.append(elastic_condition(spec, ctx.elastic))
        self.write_status(
            ObservedState(
                generation=self.generation,
                conditions=conditions,
                model=model.as_status(spec.model.uri),
                image=image,
                endpoint=endpoint,
                replicas=replicas,
                ready_replicas=ready,
                delivery=delivery,
                idle_since=idle_since,
            )
        )
        resolution = conditions[0]
        if resolution.status == "True":
            if ctx.elastic:
                return Outcome(requeue_after=ELASTIC_POLL_S, message="following the Knative Revision's scale")
            return Outcome()
        self.warn_once(resolution)
        # Serving the last resolved version while resolution fails is a planned wait, not a failure.
        return Outcome(requeue_after=refresh_s, message=resolution.message)

    def api_keys_problem(self, spec: Phi3ModelSpec) -> str | None:
        """Why spec.auth's Secret cannot serve as API keys, or None. Only counts keys: never a value."""
        if spec.auth is None:
            return None
        name = spec.auth.api_key_secret
        try:
            keys = self.r.api.read_secret(self.owner.namespace, name)
        except KubeError as error:
            if error.status not in (403, 404):
                raise
            return f"the Secret {name} in auth.apiKeySecretRef does not exist or the operator may not read it"
        if not any(value.strip() for value in keys.values()):
            return f"the Secret {name} in auth.apiKeySecretRef holds no key"
        return None

    def credentials(self, spec: Phi3ModelSpec) -> dict[str, str]:
        if not spec.model.credentials_secret:
            return {}
        try:
            return self.r.api.read_secret(self.owner.namespace, spec.model.credentials_secret)
        except KubeError as error:
            if error.status not in (403, 404):
                raise
            raise ResolveError("CredentialsUnavailable", error.message, retryable=True) from None

    def ensure_build(
        self, spec: Phi3ModelSpec, model: ResolvedModel, decision: ImageDecision
    ) -> tuple[str | None, Condition, float | None]:
        """(built image or None, the ImageReady condition, when to look again) for a model that needs a build."""
        needs = ", ".join(decision.missing) or "an image of its own (image.policy: Build)"
        if not spec.image.registry:
            message = f"the model needs {needs}, which means a build, but spec.image.registry is empty"
            return None, Condition("ImageReady", "False", "RegistryRequired", message), None
        settings = self.r.settings
        request = BuildRequest(
            base_image=decision.base_image,
            requirements=requirements_named(model.requirements, decision.missing),
            registry=spec.image.registry,
            namespace=self.owner.namespace,
            builder_image=settings.builder_image,
            push_secret=spec.image.push_secret,
            build_args=settings.build_args,
            plain_http_registries=tuple(
                image.split("/", maxsplit=1)[0] for image in (decision.base_image, spec.image.registry)
                if settings.plain_http(image)
            ),
            node_selector=spec.hardware.node_selector,
            tolerations=spec.hardware.tolerations,
        )
        previous = {c.get("type"): c for c in self.current_status.get("conditions", [])}.get("ImageReady", {})
        if self.current_status.get("image") == request.image and previous.get("reason") == "Built":
            return request.image, Condition("ImageReady", "True", "Built", str(previous.get("message", ""))), None
        outcome, message = job_outcome(self.r.api.get(ObjectKey("batch/v1", "Job", self.owner.namespace, request.name)))
        if outcome == "Missing":
            # Both are shared by every model with the same needs: no owner, so one model's deletion
            # cannot take the build from the others.
            self.r.api.apply_if_changed(build_context_configmap(request))
            self.r.api.apply_if_changed(build_job(request))
            self.event("Normal", "BuildStarted", f"building {request.image} for {needs} in Job {request.name}")
            return None, Condition("ImageReady", "False", "Building", f"building {request.image} in Job "
                                   f"{request.name}"), BUILD_POLL_S
        if outcome == "Built":
            return request.image, Condition("ImageReady", "True", "Built", message), None
        if outcome == "BuildFailed":
            return None, Condition("ImageReady", "False", "BuildFailed", message), None
        return None, Condition("ImageReady", "False", "Building", message), BUILD_POLL_S

    def deliver(
        self, spec: Phi3ModelSpec, model: ResolvedModel, runtime_image: str, tracking_uri: str, elastic: bool,
    ) -> tuple[dict[str, Any] | None, Condition, float | None]:
        """(status.delivery or None while the model cannot be delivered yet, the ModelDelivered
        condition, when to look again). ImageVolume publishes the version once, through a Job."""
        settings = self.r.settings
        requested = spec.model.delivery
        if elastic:
            return {"mode": "Download"}, Condition(
                "ModelDelivered", "True", "PerPodDownload",
                "each pod downloads the model from MLflow (a Knative Revision cannot mount an image volume)"), None
        choice = choose_delivery(requested, settings.model_registry, spec.image.registry,
                                 self.r.server_minor() if requested == "Auto" and settings.model_registry else None,
                                 model.name or self.owner.name)
        download = {"mode": "Download"}
        if choice.mode == "Download":
            return download, Condition("ModelDelivered", "True", "PerPodDownload",
                                       f"each pod downloads the model from MLflow ({choice.why})"), None
        if not choice.repository:
            message = ("model.delivery is ImageVolume, but there is no registry for model images: set the chart's "
                       "config.modelRegistry or spec.image.registry")
            return None, Condition("ModelDelivered", "False", "ModelRegistryRequired", message), None
        request = PublishRequest(
            model_uri=model.uri, version=model.version, tracking_uri=tracking_uri, repository=choice.repository,
            namespace=self.owner.namespace, runtime_image=runtime_image,
            plain_http=settings.plain_http(choice.repository),
            credentials_secret=spec.model.credentials_secret or "", push_secret=spec.image.push_secret,
            node_selector=spec.hardware.node_selector, tolerations=spec.hardware.tolerations,
        )
        previous = self.current_status.get("delivery") or {}
        if previous.get("tag") == request.image and previous.get("image"):
            return dict(previous), Condition("ModelDelivered", "True", "Published",
                                             f"pods mount {previous['image']} as an image volume"), None
        job_key = ObjectKey("batch/v1", "Job", self.owner.namespace, request.name)
        job = self.r.api.get(job_key)
        finished = job is not None and any(c.get("status") == "True" and c.get("type") in ("Complete", "Failed")
                                           for c in job.get("status", {}).get("conditions", []))
        pods = self.r.api.list_pods(self.owner.namespace, {"job-name": request.name}) if finished else []
        outcome = publish_outcome(job, pods)
        if outcome.state == "Published":
            published = {"mode": "ImageVolume", "image": outcome.image, "tag": request.image,
                         "sizeBytes": outcome.size_bytes}
            return published, Condition("ModelDelivered", "True", "Published",
                                        f"pods mount {outcome.image} as an image volume"), None
        if outcome.state == "Missing":
            # Shared by every model serving this version: no owner, so one model's deletion cannot take it.
            self.r.api.apply_if_changed(publish_job(request))
            self.event("Normal", "PublishStarted", f"publishing {model.uri} as {request.image} in Job {request.name}")
            return None, Condition("ModelDelivered", "False", "Publishing",
                                   f"publishing {model.uri} as {request.image} in Job {request.name}"), BUILD_POLL_S
        if outcome.state == "Publishing":
            return None, Condition("ModelDelivered", "False", "Publishing", outcome.message), BUILD_POLL_S
        if outcome.state == "Unfetchable":
            return None, Condition("ModelDelivered", "False", "ModelUnavailable", outcome.message), None
        if requested == "Auto":
            return download, Condition("ModelDelivered", "True", "PerPodDownload",
                                       f"{outcome.message}; each pod downloads the model from MLflow instead"), None
        return None, Condition("ModelDelivered", "False", "PublishFailed", outcome.message), None

    def hold_for_build(
        self, conditions: list[Condition], image_condition: Condition, retry_after: float | None,
        model_status: dict[str, Any],
    ) -> Outcome:
        """No image yet: whatever Deployment already serves is left exactly as it is."""
        live = self.r.api.get(ObjectKey("apps/v1", "Deployment", self.owner.namespace, self.owner.name))
        available, replicas, ready = self.r.serving_condition(live)
        previous_image = str(self.current_status.get("image", "")) if live is not None else ""
        failing = self.fail(
            [*conditions, image_condition, available],
            model=model_status,
            image=previous_image,
            replicas=replicas,
            ready_replicas=ready,
        )
        # A running build is polled (a planned wait); a failed one waits for a person.
        return Outcome(requeue_after=retry_after, message=failing.message)

    def apply_children(self, ctx: BuildContext) -> tuple[dict[str, Any] | None, set[tuple[str, str]]]:
        """(the live child that serves, a Deployment or a Configuration; the kinds applied)."""
        deployment: dict[str, Any] | None = None
        deployment_was_new = False
        applied = []
        desired = build_children(ctx)
        # A model that no operator has written status for is new: its children cannot exist yet. (The
        # CRD defaults status.observedGeneration to 0 before that, hence conditions, not status.)
        brand_new = not self.current_status.get("conditions")
        for manifest in desired:
            live, change = self.r.api.apply_if_changed(manifest, known_absent=brand_new)
            if change != "unchanged":
                self.r.metrics.wrote(manifest["kind"])
                applied.append(f"{change} {manifest['kind']} {manifest['metadata']['name']}")
            if manifest["kind"] in ("Deployment", "Configuration"):  # what serves: the first child
                deployment, deployment_was_new = live, change == "created"
        if applied:
            self.event("Normal", "Applied", "; ".join(applied))
        kinds = {(m["apiVersion"], m["kind"]) for m in desired}
        self.prune_optional_children(kinds, look=not deployment_was_new)
        return deployment, kinds

    def newest_revision(self, configuration: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """The Configuration's newest Revision, once Knative has made one for its current generation."""
        status = (configuration or {}).get("status", {})
        name = status.get("latestCreatedRevisionName")
        if not name:
            return None
        return self.r.api.get(ObjectKey(KNATIVE_API_VERSION, "Revision", self.owner.namespace, name))

    def delete_owned(self, api_version: str, kind: str, why: str) -> None:
        """Delete the model's child of this kind if it exists and this model owns it."""
        key = ObjectKey(api_version, kind, self.owner.namespace, self.owner.name)
        existing = self.r.api.get(key)
        if existing is not None and any(
            ref.get("uid") == self.owner.uid for ref in existing["metadata"].get("ownerReferences", [])
        ):
            self.r.api.delete(key)
            self.event("Normal", "Deleted", f"deleted {kind} {self.owner.name}: {why}")

    def prune_serving_children(self, wanted: set[tuple[str, str]]) -> None:
        """Once one way of serving is available, the other's children go (a switch of
        autoscaling.metric, or Knative installed or removed). Looked for once per object and process."""
        if self.r._serving_pruned.get(self.owner.uid) == frozenset(wanted):
            return
        for api_version, kind in SERVING_CHILDREN:
            if (api_version, kind) in wanted or (kind == "Configuration" and not self.r.knative_installed()):
                continue
            self.delete_owned(api_version, kind, "the model is served another way")
        self.r._serving_pruned[self.owner.uid] = frozenset(wanted)

    def prune_optional_children(self, wanted: set[tuple[str, str]], look: bool) -> None:
        """Delete an HPA or PDB that the spec no longer asks for.

        Finding out costs a GET per kind, so it is done once per object and process, and again only
        where this process applied one; a brand-new Deployment means there was nothing to prune.
        """
        for api_version, kind in OPTIONAL_CHILDREN:
            if (api_version, kind) in wanted:
                self.r._optional_children.add((self.owner.uid, kind))
                continue
            known = (self.owner.uid, kind) in self.r._optional_children
            if not known and (not look or self.owner.uid in self.r._pruned):
                continue
            self.delete_owned(api_version, kind, "the spec no longer asks for it")
            self.r._optional_children.discard((self.owner.uid, kind))
        self.r._pruned.add(self.owner.uid)

    def announce_version(self, model: ResolvedModel) -> None:
        previous = (self.current_status.get("model") or {}).get("resolvedUri")
        if previous and previous != model.uri:
            self.event("Normal", "ModelVersionChanged", f"rolling from {previous} to {model.uri}")
