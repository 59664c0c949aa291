"""Start the operator: settings, the API client, the resolver, then kopf."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import socket
from dataclasses import dataclass

import kopf

from phi3_operator.handlers import register
from phi3_operator.k8s import KubeApi, new_api_client
from phi3_operator.leader import LeaderElector
from phi3_operator.metrics import serve as serve_metrics
from phi3_operator.reconcile import Reconciler, merge_work
from phi3_operator.resolve import Resolver, mlflow_lookup
from phi3_operator.settings import OperatorSettings
from phi3_operator.workqueue import WorkQueue


@dataclass(frozen=True)
class RunOptions:
    namespaces: tuple[str, ...] = ()
    config_path: str | None = None
    liveness_endpoint: str | None = None
    peering_name: str | None = None
    metrics_address: str | None = None  # host:port
    # The namespace of the Lease that elects one active replica; None runs without election.
    leader_election_namespace: str | None = None
    verbose: bool = False


def run(options: RunOptions) -> None:
    # `kill -USR1 <pid>` prints every thread's stack: how to see what a stuck reconcile waits on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    # kopf's own format prefixes each line with the object it is about: [namespace/name].
    kopf.configure(verbose=options.verbose, log_prefix=True)
    logging.getLogger("phi3_operator").setLevel(logging.DEBUG if options.verbose else logging.INFO)
    # MLflow draws progress bars for every MLmodel it reads; they are noise in an operator log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    settings = OperatorSettings.load(options.config_path)
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    reconciler = Reconciler(
        api=KubeApi(new_api_client(identity), settings.field_manager),
        settings=settings,
        resolver=Resolver(lookup=mlflow_lookup, refresh_interval_s=settings.model_refresh_interval_s),
    )
    if options.metrics_address:
        host, _, port = options.metrics_address.rpartition(":")
        serve_metrics(reconciler.metrics, host or "0.0.0.0", int(port))
    queue = WorkQueue(reconciler.handle, merge_work, workers=settings.max_workers, name="reconcile")
    reconciler.metrics.watch_queue(queue.waiting)
    registry = kopf.OperatorRegistry()
    register(registry, settings, namespaces=options.namespaces)
    elector = None
    if options.leader_election_namespace:
        elector = LeaderElector(reconciler.api, options.leader_election_namespace, identity)
        # Until kopf installs its own handler, SIGTERM unwinds through `finally`, which releases the Lease.
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        if elector is not None:
            # A standby watches nothing and reconciles nothing until it holds the Lease.
            elector.acquire()
            # Losing the Lease ends the process at once (as controller-runtime does): the new leader may
            # already be reconciling, and kopf has no way to stop its watches part-way.
            elector.renew_until_lost(on_lost=lambda: os._exit(1))
        asyncio.run(
            kopf.operator(
                registry=registry,
                memo=kopf.Memo(reconciler=reconciler, queue=queue),
                clusterwide=not options.namespaces,
                namespaces=list(options.namespaces),
                standalone=options.peering_name is None,
                peering_name=options.peering_name,
                liveness_endpoint=options.liveness_endpoint,
            )
        )
    finally:
        if elector is not None:
            elector.release()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)
