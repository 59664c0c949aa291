"""checkov, a real policy scanner, over what reaches a cluster: the chart as `helm template` renders it
and the children the operator's builders generate. Only the findings named below remain, each for a
reason; a new one fails the test.

checkov is installed once into a virtualenv of its own under the cache (its dependency pins cannot
share the project's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from phi3_operator.builders import BuildContext, Owner, build_children
from phi3_operator.spec import parse_spec
from tests.chart.helpers import Helm

CHECKOV_VERSION = "3.3.30"
CACHE = Path(os.environ.get("PHI3_CACHE_DIR", Path.home() / ".cache" / "phi3-operator"))
UID_1000 = "UID 1000 is the images' own user (images/*/Dockerfile), run with runAsNonRoot; not a host account"
# What remains in the chart, and why.
ACCEPTED_IN_CHART = {
    "CKV_K8S_43": "the default image is a tag, as nothing is published; image.digest pins it (the demo sets it)",
    "CKV_K8S_15": "IfNotPresent, not Always: with a digest it is exact; Always makes each restart need the registry",
    "CKV_K8S_38": "the operator talks to the API server: a ServiceAccount token is what it runs on",
    "CKV_K8S_40": UID_1000,
}
# What remains in a model's children with spec.network and spec.auth set, and why.
ACCEPTED_IN_CHILDREN = {
    "CKV_K8S_11": "no CPU limit on model pods by default: CFS throttling stalls token decoding mid-stream; "
                  "resources.limits.cpu sets one",
    "CKV_K8S_40": UID_1000,
}
# Without spec.network there is no NetworkPolicy: it is opt-in, because which callers to admit is the user's call.
WITHOUT_NETWORK = {"CKV2_K8S_6"}


@pytest.fixture(scope="module")
def checkov() -> Path:
    venv = CACHE / f"checkov-{CHECKOV_VERSION}"
    binary = venv / "bin" / "checkov"
    if not binary.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"checkov=={CHECKOV_VERSION}"],
                       check=True, timeout=900)
    return binary


def failed_checks(checkov: Path, documents: list[dict[str, Any]], workdir: Path) -> dict[str, set[str]]:
    """check id -> the resources it failed on."""
    manifest = workdir / "manifests.yaml"
    manifest.write_text(yaml.safe_dump_all(documents))
    proc = subprocess.run([str(checkov), "-f", str(manifest), "--framework", "kubernetes", "--quiet", "--compact",
                           "-o", "json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1: some check failed
    reports = json.loads(proc.stdout)
    failed: dict[str, set[str]] = {}
    for report in reports if isinstance(reports, list) else [reports]:
        assert report["summary"]["passed"] > 0, report["summary"]
        for check in report["results"]["failed_checks"]:
            failed.setdefault(check["check_id"], set()).add(check["resource"])
    return failed


def children(**spec: Any) -> list[dict[str, Any]]:
    raw = {"model": {"uri": "models:/phi3-mini@champion"}, "hardware": {"target": "cpu"},
           "autoscaling": {"maxReplicas": 3}, "disruptionBudget": {"maxUnavailable": 1}, **spec}
    ctx = BuildContext(owner=Owner("phi3-mini", "llm", "uid-1"), spec=parse_spec(raw),
                       image="ghcr.io/phi3-operator/mlserver-cpu@sha256:" + "a" * 64, model_uri="models:/phi3-mini/1",
                       tracking_uri="http://mlflow.mlflow.svc:5000", onnx_variant="cpu-int4",
                       monitoring_peers=({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                                                "monitoring"}}},))
    return build_children(ctx)


def test_the_chart_fails_only_the_accepted_checks(checkov: Path, helm: Helm, tmp_path: Path) -> None:
    failed = failed_checks(checkov, helm.template(), tmp_path)
    print(f"checkov on the chart: failed {sorted(failed)}")
    assert set(failed) == set(ACCEPTED_IN_CHART), failed


def test_secured_children_fail_only_the_accepted_checks(checkov: Path, tmp_path: Path) -> None:
    secured = children(auth={"apiKeySecretRef": {"name": "phi3-mini-keys"}},
                       network={"allowFrom": [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]})
    failed = failed_checks(checkov, secured, tmp_path)
    print(f"checkov on a model's children (network and auth set): failed {sorted(failed)}")
    assert set(failed) == set(ACCEPTED_IN_CHILDREN), failed
    plain = failed_checks(checkov, children(), tmp_path)
    assert set(plain) == set(ACCEPTED_IN_CHILDREN) | WITHOUT_NETWORK, plain
