"""The Argo CD health check (charts/phi3-operator/argocd/health.lua) in a real Lua interpreter."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from phi3_operator.status import REASON_TABLE, Condition, ObservedState, build_status
from tests.chart.helpers import HEALTH_LUA, TESTDATA_HEALTH, argocd_health

# (document, Argo CD status, message: the Ready condition's message)
CASES = [
    ("healthy", "Healthy", "The model is served and all replicas are ready"),
    ("progressing", "Progressing", "rollout in progress: 0/1 replicas available"),
    ("degraded-build-failed", "Degraded", "build job phi3-mini-build-7 failed: pip could not install flash-attn"),
    ("progressing-mlflow-unavailable", "Progressing",
     "MLflow at http://mlflow.mlflow.svc:5000 is unreachable: connection refused"),
    # Ready=True describes generation 4; generation 5 is not rolled out yet.
    ("stale-generation", "Progressing", "The model is served and all replicas are ready"),
    ("failed-phase", "Degraded", "the operator gave up on this spec"),
    ("no-status", "Progressing", "Waiting for the operator to reconcile the Phi3Model"),
]

# The operator's reason table decides: terminal reasons are Degraded, all other failures Progressing.
TERMINAL = sorted(r.name for r in REASON_TABLE if r.kind == "terminal")
NOT_TERMINAL = sorted(r.name for r in REASON_TABLE if r.kind in ("progressing", "transient"))


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((TESTDATA_HEALTH / f"{name}.yaml").read_text())
    return doc


def with_ready(obj: dict[str, Any], status: str, reason: str, phase: str = "Deploying") -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["status"]["phase"] = phase
    for condition in obj["status"]["conditions"]:
        if condition["type"] == "Ready":
            condition.update(status=status, reason=reason, message=f"because {reason}")
    return obj


def test_every_case_has_a_document() -> None:
    assert sorted(p.stem for p in TESTDATA_HEALTH.glob("*.yaml")) == sorted(name for name, _, _ in CASES)


@pytest.mark.parametrize(("name", "status", "message"), CASES, ids=[c[0] for c in CASES])
def test_health_of_status_documents(lua: str, name: str, status: str, message: str) -> None:
    assert argocd_health(lua, load(name)) == (status, message)


@pytest.mark.parametrize("reason", TERMINAL)
def test_terminal_reasons_are_degraded(lua: str, reason: str) -> None:
    obj = with_ready(load("progressing"), "False", reason)
    assert argocd_health(lua, obj) == ("Degraded", f"because {reason}")


@pytest.mark.parametrize("reason", NOT_TERMINAL)
def test_transient_reasons_are_progressing(lua: str, reason: str) -> None:
    obj = with_ready(load("progressing"), "False", reason)
    assert argocd_health(lua, obj) == ("Progressing", f"because {reason}")


def test_stale_generation_wins_over_a_degraded_status(lua: str) -> None:
    # A new spec may fix what failed: until the operator has looked at it, it is progressing.
    obj = load("degraded-build-failed")
    obj["metadata"]["generation"] = 5
    assert argocd_health(lua, obj)[0] == "Progressing"


def test_missing_observed_generation_is_progressing(lua: str) -> None:
    obj = load("healthy")
    del obj["status"]["observedGeneration"]
    assert argocd_health(lua, obj)[0] == "Progressing"


def test_status_without_conditions_is_progressing(lua: str) -> None:
    obj = load("healthy")
    obj["status"] = {"observedGeneration": 3}
    assert argocd_health(lua, obj) == ("Progressing", "Waiting for the operator to reconcile the Phi3Model")


def test_messages_with_quotes_and_unicode_survive(lua: str) -> None:
    obj = with_ready(load("healthy"), "True", "Ready")
    obj["status"]["conditions"][-1]["message"] = 'model "phi3" – ready\\n'
    assert argocd_health(lua, obj) == ("Healthy", 'model "phi3" – ready\\n')



def test_health_script_avoids_lua_5_2_and_later_syntax() -> None:
    # Argo CD runs gopher-lua (Lua 5.1); the tests run Lua 5.4, so keep to the common subset.
    source = HEALTH_LUA.read_text()
    for construct in ("goto ", "<const>", "<close>", "::"):
        assert construct not in source, construct


@pytest.mark.parametrize("reason", [r for r in REASON_TABLE if r.kind != "ok"], ids=lambda r: r.name)
def test_statuses_the_operator_writes_read_as_the_reason_table_says(lua: str, reason: object) -> None:
    name = reason.name  # type: ignore[attr-defined]
    obj = load("progressing")
    obj["metadata"]["generation"] = 2
    obj["status"] = build_status({}, ObservedState(generation=2, conditions=[Condition("Available", "False", name,
                                                                                         "why")]), "t")
    expected = "Degraded" if reason.kind == "terminal" else "Progressing"  # type: ignore[attr-defined]
    assert argocd_health(lua, obj) == (expected, "why")


def test_a_model_scaled_to_zero_by_design_is_healthy(lua: str) -> None:
    """Elastic serving at zero replicas: what the operator writes (Available ScaledToZero, and the advisory
    ElasticServing) reads Healthy, not Progressing."""
    conditions = [Condition("ModelResolved", "True", "Resolved", ""), Condition("ImageReady", "True", "Catalog", ""),
                  Condition("Available", "True", "ScaledToZero", "Revision m-00001 is scaled to zero"),
                  Condition("ElasticServing", "True", "Knative", "Knative Serving scales it")]
    status = build_status({}, ObservedState(generation=2, conditions=conditions, idle_since="2026-12-04T03:00:00Z"),
                          "2026-12-04T03:00:00Z")
    obj = {"apiVersion": "phi3.ai/v1alpha1", "kind": "Phi3Model", "metadata": {"name": "m", "generation": 2},
           "status": status}
    assert argocd_health(lua, obj) == ("Healthy", "The model is served and all replicas are ready")
