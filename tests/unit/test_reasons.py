"""The table of condition reasons (status.REASON_TABLE) against everything that restates it.

It decides the phase and kstatus's Reconciling/Stalled in code; the Argo CD health check and the
README's troubleshooting table restate it, and every reason the operator can emit must be in it.
tests/chart/test_argocd_health.py runs the health check itself for each reason in a real Lua.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from phi3_operator.status import (
    CONDITION_TYPES,
    REASON_TABLE,
    REASONS,
    TERMINAL_REASONS,
    Condition,
    ObservedState,
    Reason,
    build_status,
    failure_status,
)

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = ROOT / "operator" / "phi3_operator"
HEALTH_LUA = ROOT / "charts" / "phi3-operator" / "argocd" / "health.lua"
FAILURES = [r for r in REASON_TABLE if r.kind != "ok"]


def emitted_reasons() -> set[str]:
    """Reasons the operator's source can put on a condition: literal Condition(...) reasons, ResolveError
    reasons, job outcomes, image sources."""
    found: set[str] = set()
    for path in OPERATOR.rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r'Condition\(\s*"\w+",\s*"(?:True|False|Unknown)",\s*"(\w+)"', text))
        found |= set(re.findall(r'ResolveError\(\s*"(\w+)"', text))
        found |= set(re.findall(r'return "(Built|BuildFailed|Building)", ', text))
        found |= set(re.findall(r'source="(\w+)"', text))
    return found - {"Build"}  # a Build decision ends in a job outcome, never a condition of its own


def test_every_reason_the_operator_emits_is_in_the_table() -> None:
    emitted = emitted_reasons()
    assert {"InvalidSpec", "MLflowUnavailable", "ReconcileError", "BuildFailed", "Catalog"} <= emitted
    assert emitted - set(REASONS) == set()


def test_every_failure_has_help_and_a_terminal_failure_means_phase_failed() -> None:
    for reason in FAILURES:
        assert reason.help, reason.name
        assert (reason.kind == "terminal") == (reason.phase == "Failed"), reason.name


@pytest.mark.parametrize("reason", FAILURES, ids=[r.name for r in FAILURES])
def test_the_table_drives_phase_and_kstatus_conditions(reason: Reason) -> None:
    entry = REASONS[reason.name]
    failing = Condition(entry.condition if entry.condition != "Ready" else "Available", "False", entry.name, "why")
    if entry.condition == "Ready":
        status = failure_status({}, 2, Condition("Ready", "False", entry.name, "why"), "t")
    else:
        status = build_status({}, ObservedState(generation=2, conditions=[failing]), "t")
    by_type = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == entry.phase and status["observedGeneration"] == 2
    assert by_type["Ready"]["status"] == "False" and by_type["Ready"]["reason"] == entry.name
    stalled = entry.kind == "terminal"
    assert by_type["Stalled"]["status"] == ("True" if stalled else "False")
    assert by_type["Reconciling"]["status"] == ("False" if stalled else "True")


def test_a_served_model_is_neither_reconciling_nor_stalled() -> None:
    ok = [Condition("ModelResolved", "True", "Resolved", ""), Condition("Available", "True", "ScaledToZero", "")]
    status = build_status({}, ObservedState(generation=1, conditions=ok), "t")
    by_type = {c["type"]: c["status"] for c in status["conditions"]}
    assert status["phase"] == "Ready" and by_type == {"ModelResolved": "True", "Available": "True", "Ready": "True",
                                                      "Reconciling": "False", "Stalled": "False"}


def test_a_terminal_failure_outranks_a_transient_one() -> None:
    conditions = [Condition("ModelResolved", "False", "MLflowUnavailable", "down; still serving"),
                  Condition("Available", "False", "ProgressDeadlineExceeded", "stuck")]
    status = build_status({}, ObservedState(generation=1, conditions=conditions), "t")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert status["phase"] == "Failed" and ready["reason"] == "ProgressDeadlineExceeded"


def test_the_argocd_health_check_lists_exactly_the_terminal_reasons() -> None:
    source = HEALTH_LUA.read_text()
    block = re.search(r"local TERMINAL_REASONS = \{(.*?)\n\}", source, re.S)
    assert block is not None
    assert set(re.findall(r"(\w+) = true", block.group(1))) == TERMINAL_REASONS


def test_the_readme_troubleshooting_table_is_the_reason_table() -> None:
    readme = (ROOT / "README.md").read_text()
    row = re.compile(r"\| `\w+` \| (" + "|".join(CONDITION_TYPES) + r") \|")
    rows = [line for line in readme.splitlines() if row.match(line)]
    expected = [f"| `{r.name}` | {r.condition} | {r.kind} | {r.phase} | {r.help} |" for r in FAILURES]
    assert rows == expected, "regenerate the README's reason rows from status.REASON_TABLE"
