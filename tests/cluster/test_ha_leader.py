"""Two real operator processes elect a leader with a Lease on the real API server; only the leader
reconciles, and a SIGKILLed leader hands over to the standby within a bounded time (reported)."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from tests.support.cluster import Cluster
from tests.support.operator import OperatorProcess, operator_env
from tests.support.wait import wait_until

pytestmark = pytest.mark.cluster

HANDOVER_BOUND_S = 15.0  # lease 10 s + one retry period (2 s, with jitter) + kopf's start-up


def model(name: str, uri: str) -> dict[str, Any]:
    return {"apiVersion": "phi3.ai/v1alpha1", "kind": "Phi3Model", "metadata": {"name": name},
            "spec": {"model": {"uri": uri}, "hardware": {"target": "cpu"}}}


def reconciled(cluster: Cluster, namespace: str, name: str) -> bool:
    obj = cluster.get("phi3", name, namespace)
    return bool(obj.get("status", {}).get("conditions"))


@pytest.fixture
def replicas(
    crd: Cluster, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> Iterator[list[OperatorProcess]]:
    # The session's operator watches every namespace without election: it must not do the replicas' work.
    operator.stop()
    config = Path(__file__).parent / "testdata" / "operator-config.yaml"
    processes = [
        OperatorProcess(cluster=crd, log_path=tmp_path / f"replica-{name}.log",
                        args=("--leader-election-namespace", namespace, "--namespace", namespace),
                        extra_env={**operator_env(resync_s=30.0, refresh_s=30.0), "POD_NAME": f"replica-{name}",
                                   "PHI3_OPERATOR_CONFIG": str(config)})
        for name in ("a", "b")
    ]
    for process in processes:
        process.start()
    yield processes
    for process in processes:
        process.stop(signal.SIGKILL)
    operator.start()


def test_only_the_leader_reconciles_and_a_killed_leader_hands_over(
    crd: Cluster, namespace: str, replicas: list[OperatorProcess], pyfunc_model_uri: str
) -> None:
    def leader() -> OperatorProcess | None:
        holding = [p for p in replicas if "became leader" in p.log()]
        assert len(holding) <= 1, "two replicas hold the Lease at once"
        return holding[0] if holding else None

    first: OperatorProcess = wait_until(leader, timeout=60, message="a replica to become leader")
    standby = next(p for p in replicas if p is not first)
    crd.apply(model("before", pyfunc_model_uri), namespace)
    wait_until(lambda: reconciled(crd, namespace, "before"), timeout=60, message="the leader to reconcile")
    assert "waiting to become leader" in standby.log() and "became leader" not in standby.log()
    assert "before" not in standby.log(), "the standby must not reconcile"
    lease = json.loads(crd.kubectl("get", "lease", "phi3-operator", "-n", namespace, "-o", "json").stdout)
    assert lease["spec"]["holderIdentity"] == first.extra_env["POD_NAME"]

    # The leader dies without releasing the Lease; a model created meanwhile waits for the standby.
    first.stop(signal.SIGKILL)
    killed = time.monotonic()
    killed_at = datetime.now(timezone.utc)
    crd.apply(model("after", pyfunc_model_uri), namespace)
    wait_until(lambda: reconciled(crd, namespace, "after"), timeout=60, message="the standby to take over")
    handover = time.monotonic() - killed
    print(f"\nHA handover: leader SIGKILLed -> new model reconciled by the standby in {handover:.1f} s")
    assert "became leader" in standby.log()
    assert handover < HANDOVER_BOUND_S, f"handover took {handover:.1f} s"

    # The API server's audit log: which replica wrote what, when (each replica's User-Agent names it).
    writes = replica_writes(crd, namespace)
    by_first = [at for at, who in writes if who == first.extra_env["POD_NAME"]]
    by_standby = [at for at, who in writes if who == standby.extra_env["POD_NAME"]]
    print(f"audit: {len(by_first)} writes by the first leader, {len(by_standby)} by the standby after it took over")
    assert by_first and by_standby, writes
    assert max(by_first) <= killed_at <= min(by_standby), "two replicas reconciled at once"


def replica_writes(cluster: Cluster, namespace: str) -> list[tuple[datetime, str]]:
    """(time, replica) of every write in `namespace` by an operator replica, Lease renewals aside."""
    writes = []
    for line in (cluster.kubeconfig.parent / "audit.log").read_text(errors="replace").splitlines():
        event = json.loads(line)
        agent, ref = event.get("userAgent", ""), event.get("objectRef", {})
        match = re.match(r"phi3-operator/\S+ \((.+)\)$", agent)
        if match and ref.get("namespace") == namespace and ref.get("resource") != "leases":
            at = datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00"))
            writes.append((at, match.group(1)))
    return writes


def test_a_leader_that_shuts_down_cleanly_hands_over_at_once(
    crd: Cluster, namespace: str, replicas: list[OperatorProcess], pyfunc_model_uri: str
) -> None:
    first: OperatorProcess = wait_until(lambda: next((p for p in replicas if "became leader" in p.log()), None),
                                        timeout=60, message="a replica to become leader")
    standby = next(p for p in replicas if p is not first)
    first.stop(signal.SIGTERM)  # kopf exits, the operator releases the Lease
    stopped = time.monotonic()
    assert "released the Lease" in first.log()
    crd.apply(model("after-release", pyfunc_model_uri), namespace)
    wait_until(lambda: reconciled(crd, namespace, "after-release"), timeout=30, message="the standby to take over")
    handover = time.monotonic() - stopped
    print(f"\nHA handover after a clean shutdown: {handover:.1f} s")
    assert "became leader" in standby.log()
    assert handover < 8.0, f"a released Lease was taken after {handover:.1f} s"
