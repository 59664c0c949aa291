"""kstatus itself (sigs.k8s.io/cli-utils, what Flux and cli-utils' apply wait on) reads our models right:
a terminal failure as Failed, work in progress and transient failures as InProgress, only a served
model as Current, and a model no operator has reconciled yet (on the real API server) not as Current.

hack/kstatus is a small Go program around `status.Compute`, built from the Go module proxy once and
cached under ~/.cache/phi3-operator/kstatus-<version>/ as hack/localcluster caches its binaries.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from tests.support.cluster import Cluster
from tests.support.operator import OperatorProcess

from phi3_operator.status import REASON_TABLE, Condition, ObservedState, Reason, build_status, failure_status

pytestmark = pytest.mark.cluster

KSTATUS_VERSION = "v0.37.2"  # hack/kstatus/go.mod
SOURCE = Path(__file__).resolve().parents[2] / "hack" / "kstatus"
FAILURES = [r for r in REASON_TABLE if r.kind != "ok"]


@pytest.fixture(scope="module")
def kstatus() -> Path:
    cache = Path(os.environ.get("PHI3_CACHE_DIR", Path.home() / ".cache" / "phi3-operator"))
    binary = cache / f"kstatus-{KSTATUS_VERSION}" / "kstatus"
    if not binary.exists():
        go = shutil.which("go")
        assert go, "building hack/kstatus needs Go on PATH (as hack/localcluster build does)"
        binary.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([go, "build", "-o", str(binary), "."], cwd=SOURCE, check=True, timeout=900)
    return binary


def compute(kstatus: Path, objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    proc = subprocess.run([str(kstatus)], input=json.dumps(objects), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [(r["status"], r["message"]) for r in json.loads(proc.stdout)]


def model(status: dict[str, Any] | None, generation: int = 2) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "phi3.ai/v1alpha1", "kind": "Phi3Model",
                           "metadata": {"name": "m", "namespace": "ns", "generation": generation},
                           "spec": {"model": {"uri": "models:/m/1"}, "hardware": {"target": "cpu"}}}
    if status is not None:
        obj["status"] = status
    return obj


def status_for(reason: Reason) -> dict[str, Any]:
    """The status the operator writes when `reason` is the failure."""
    if reason.condition == "Ready":  # a failure of the pass itself
        return failure_status({}, 2, Condition("Ready", "False", reason.name, f"because {reason.name}"), "t")
    conditions = [Condition("ModelResolved", "True", "Resolved", "ok"),
                  Condition(reason.condition, "False", reason.name, f"because {reason.name}")]
    return build_status({}, ObservedState(generation=2, conditions=conditions), "t")


def test_kstatus_reads_every_reason_as_the_table_says(kstatus: Path) -> None:
    results = compute(kstatus, [model(status_for(reason)) for reason in FAILURES])
    wrong = []
    for reason, (computed, message) in zip(FAILURES, results, strict=True):
        expected = "Failed" if reason.kind == "terminal" else "InProgress"
        if computed != expected or message != f"because {reason.name}":
            wrong.append(f"{reason.name} ({reason.kind}): {computed} {message!r}, expected {expected}")
    assert not wrong, "\n".join(wrong)


def test_kstatus_reads_a_served_model_as_current_and_a_stale_one_as_in_progress(kstatus: Path) -> None:
    ok = [Condition("ModelResolved", "True", "Resolved", ""), Condition("ImageReady", "True", "Catalog", ""),
          Condition("Available", "True", "MinimumReplicasAvailable", "1/1 replicas are available")]
    served = build_status({}, ObservedState(generation=2, conditions=ok, replicas=1, ready_replicas=1), "t")
    stale = model(served, generation=3)  # a new spec the operator has not looked at yet
    assert [s for s, _ in compute(kstatus, [model(served), stale])] == ["Current", "InProgress"]


def test_kstatus_reads_a_model_scaled_to_zero_by_design_as_current(kstatus: Path) -> None:
    conditions = [Condition("ModelResolved", "True", "Resolved", ""), Condition("ImageReady", "True", "Catalog", ""),
                  Condition("Available", "True", "ScaledToZero", "Revision m-00001 is scaled to zero"),
                  Condition("ElasticServing", "True", "Knative", "Knative Serving scales it")]
    idle = build_status({}, ObservedState(generation=2, conditions=conditions, idle_since="t"), "t")
    assert [s for s, _ in compute(kstatus, [model(idle)])] == ["Current"]


def test_a_model_no_operator_has_reconciled_is_not_current(
    kstatus: Path, crd: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """No operator runs here: what the API server itself returns for a fresh model (the CRD defaults
    status.observedGeneration to 0) must read as InProgress, or Flux would call the rollout healthy."""
    operator.stop()  # the session's operator, if another test started it
    try:
        fresh = model(None, generation=1)
        fresh["metadata"] = {"name": "fresh", "namespace": namespace}
        crd.kubectl("apply", "-f", "-", stdin=json.dumps(fresh))
        live = json.loads(crd.kubectl("get", "phi3model", "fresh", "-n", namespace, "-o", "json").stdout)
    finally:
        operator.start()
    assert live.get("status") == {"observedGeneration": 0}, live.get("status")
    expected = ("InProgress", "Phi3Model generation is 1, but latest observed generation is 0")
    assert compute(kstatus, [live]) == [expected]
