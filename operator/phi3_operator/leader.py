"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection package does it.

Only the holder of the Lease runs kopf and the work queue; the other replicas wait, serving only
/metrics and /healthz. The holder renews every `retry_s`; one that cannot renew within
`renew_deadline_s` stops the process before the Lease can expire (`lease_s` > `renew_deadline_s`),
so two replicas never reconcile at once. Expiry is judged by this process's own monotonic clock from
when it last saw the Lease change (as client-go does), never by comparing clocks across machines.
A replica that shuts down cleanly releases the Lease, so the next one takes over at its next try.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from phi3_operator.k8s import KubeApi, KubeError, ObjectKey

logger = logging.getLogger(__name__)

LEASE_API = "coordination.k8s.io/v1"


def micro_time(now: datetime | None = None) -> str:
    """metav1.MicroTime as the API server writes it."""
    return (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaderElector:
    api: KubeApi
    namespace: str
    identity: str
    name: str = "phi3-operator"
    lease_s: float = 10.0
    renew_deadline_s: float = 8.0
    retry_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    # What this process last saw of the Lease, and when by its own clock.
    _observed: tuple[str, str, str] = ("", "", "")
    _observed_at: float = 0.0
    _last_renewed: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(LEASE_API, "Lease", self.namespace, self.name)

    def try_acquire_or_renew(self) -> bool:
        """One attempt: True when this process holds the Lease afterwards."""
        lease = self.api.get(self.key)
        now = self.clock()
        if lease is None:
            return self._write(None, transitions=0)
        spec = lease.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        record = (holder, str(spec.get("renewTime") or ""), str(lease["metadata"].get("resourceVersion", "")))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.lease_s)
        if holder and holder != self.identity and self._observed_at + duration > now:
            return False  # another replica holds it and has renewed within its duration
        transitions = int(spec.get("leaseTransitions") or 0) + (holder != self.identity)
        return self._write(lease, transitions)

    def _write(self, lease: dict[str, Any] | None, transitions: int) -> bool:
        now = micro_time()
        spec = (lease or {}).get("spec") or {}
        taking_over = spec.get("holderIdentity") != self.identity
        manifest: dict[str, Any] = {
            "apiVersion": LEASE_API,
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.lease_s),
                "acquireTime": now if taking_over else spec.get("acquireTime", now),
                "renewTime": now,
                "leaseTransitions": transitions,
            },
        }
        try:
            if lease is None:
                written = self.api.create(manifest)
            else:
                # The resourceVersion makes the write conditional: of two replicas that both saw the Lease
                # expire, only one succeeds; the other gets 409 Conflict.
                manifest["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
                written = self.api.replace(manifest)
        except KubeError as error:
            if error.status in (409, 422) or (error.status == 404 and lease is not None):
                return False
            raise
        spec = written.get("spec") or {}
        self._observed = (self.identity, str(spec.get("renewTime", "")),
                          str(written["metadata"].get("resourceVersion", "")))
        self._observed_at = self._last_renewed = self.clock()
        return True

    def acquire(self) -> bool:
        """Block until this process holds the Lease (True), or `stop()` was called (False)."""
        logger.info("waiting to become leader: Lease %s/%s as %s", self.namespace, self.name, self.identity)
        while not self._stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    logger.info("became leader: Lease %s/%s", self.namespace, self.name)
                    return True
            except KubeError as error:
                logger.warning("leader election: %s", error)
            # Jitter keeps standbys from retrying in lockstep.
            self._stop.wait(self.retry_s * random.uniform(1.0, 1.2))
        return False

    def renew_until_lost(self, on_lost: Callable[[], None]) -> threading.Thread:
        """Renew from a daemon thread; call `on_lost` once renewing has failed for `renew_deadline_s`."""

        def loop() -> None:
            while not self._stop.wait(self.retry_s):
                try:
                    renewed = self.try_acquire_or_renew()
                except KubeError as error:
                    logger.warning("leader election: renewing failed: %s", error)
                    renewed = False
                if not renewed and self.clock() - self._last_renewed > self.renew_deadline_s:
                    logger.error("lost the Lease %s/%s: stopping", self.namespace, self.name)
                    on_lost()
                    return

        thread = threading.Thread(target=loop, name="leader-election", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def release(self) -> None:
        """Give the Lease up at a clean shutdown, so that a standby need not wait for it to expire."""
        self.stop()
        try:
            lease = self.api.get(self.key)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            spec = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1, "renewTime": micro_time()}
            self.api.replace({**lease, "spec": spec})
            logger.info("released the Lease %s/%s", self.namespace, self.name)
        except KubeError as error:
            logger.warning("could not release the Lease (it expires on its own): %s", error)
