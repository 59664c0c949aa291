"""Thin kopf wiring: every reaction queues work for the Reconciler's worker threads."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import kopf

from phi3_operator.builders.common import MANAGED_BY, MODEL_LABEL
from phi3_operator.reconcile import (
    DeploymentChanged,
    ModelChanged,
    ModelKey,
    Reconciler,
    Work,
    slim_deployment,
    slim_model,
)
from phi3_operator.settings import OperatorSettings
from phi3_operator.workqueue import WorkQueue

GROUP, VERSION, PLURAL = "phi3.ai", "v1alpha1", "phi3models"

logger = logging.getLogger(__name__)


def resync_loop(reconciler: Reconciler, queue: WorkQueue[ModelKey, Work], namespaces: tuple[str, ...],
                stop: threading.Event, interval_s: float) -> None:
    """Every `interval_s`, put every model on the work queue: drift is repaired and alias moves are seen.

    Only listing happens here; the reconciles run on the queue's workers like any other work, so one
    model's failure is that model's backoff and nothing else's.
    """
    while not stop.wait(interval_s):
        started = time.monotonic()
        seen = 0
        try:
            for namespace in namespaces or (None,):
                for body in reconciler.api.list_models(namespace):
                    meta = body["metadata"]
                    if not meta.get("deletionTimestamp"):
                        queue.add((meta["namespace"], meta["name"]), ModelChanged(slim_model(body)))
                        seen += 1
        except Exception:  # the loop must outlive any one failure; the next pass lists again
            logger.exception("resync listing failed after %d models", seen)
            continue
        elapsed = time.monotonic() - started
        reconciler.metrics.resynced(seen, elapsed)
        logger.info("resync: %d models in %.1fs put on the work queue, %d waiting", seen, elapsed, queue.waiting())


def register(
    registry: kopf.OperatorRegistry, operator_settings: OperatorSettings, namespaces: tuple[str, ...] = ()
) -> None:
    """Attach the handlers to `registry`; intervals come from the operator settings."""

    @kopf.on.startup(id="configure", registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf would post an Event for every handler run, timers included; we record our own,
        # only when something changed, so that a no-op resync writes nothing.
        settings.posting.enabled = False
        # Our own worker threads do the reconciling; kopf's pool runs only the few sync handlers here.
        settings.execution.max_workers = 2
        # With fixed namespaces there is nothing to discover, so no need to list namespaces (RBAC).
        settings.scanning.disabled = bool(namespaces)
        settings.watching.server_timeout = 600
        settings.watching.client_timeout = 660

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    # The reactions below are coroutines that only queue work and return: kopf then need not keep
    # each object's event and body while the worker threads wait on the API server. They are raw
    # event handlers, not kopf's create/update/resume handlers: those record their progress in the
    # object's annotations, a write per change that a level-based reconcile does not need.
    @kopf.on.event(GROUP, VERSION, PLURAL, id="model-event", registry=registry)
    async def on_model_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        body = event["object"]
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        queue: WorkQueue[ModelKey, Work] = memo["queue"]
        reconciler: Reconciler = memo["reconciler"]
        if event.get("type") == "DELETED":
            # Children go with the owner references; only what this process remembers is dropped.
            queue.forget(key)
            reconciler.forget(meta["uid"])
        elif not meta.get("deletionTimestamp") and reconciler.needs_reconcile(body):
            # The first sight of a model (created, or listed at start-up) and each spec change.
            queue.add(key, ModelChanged(slim_model(body)))

    @kopf.on.startup(id="start-workers", registry=registry)
    def start_workers(memo: kopf.Memo, **_: Any) -> None:
        # One periodic pass over all models, rather than a kopf timer per object: a timer per object
        # costs a task and its state for each of thousands of models.
        memo["queue"].start()
        stop = threading.Event()
        thread = threading.Thread(target=resync_loop, args=(memo["reconciler"], memo["queue"], namespaces, stop,
                                                            operator_settings.resync_interval_s),
                                  name="resync", daemon=True)
        memo["resync_stop"] = stop
        thread.start()

    @kopf.on.cleanup(id="stop-workers", registry=registry)
    def stop_workers(memo: kopf.Memo, **_: Any) -> None:
        memo["resync_stop"].set()
        memo["queue"].stop()

    @kopf.on.event("apps", "v1", "deployments", id="child-event",
                   labels={"app.kubernetes.io/managed-by": MANAGED_BY}, registry=registry)
    async def on_deployment_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        # Rollout progress and hand deletions show here first; the initial listing does not need it,
        # since every model is reconciled when it is first listed.
        if event.get("type") not in ("MODIFIED", "DELETED"):
            return
        deployment = event["object"]
        meta = deployment["metadata"]
        owner = (meta.get("labels") or {}).get(MODEL_LABEL)
        if not owner:
            return
        work: Work = ModelChanged() if event["type"] == "DELETED" else DeploymentChanged(slim_deployment(deployment))
        memo["queue"].add((meta["namespace"], owner), work)
