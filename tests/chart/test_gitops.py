"""The GitOps example (examples/gitops) applies with `kubectl apply --server-side -k`."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.support.cluster import REPO_ROOT, Cluster

pytestmark = pytest.mark.cluster

GITOPS = REPO_ROOT / "examples" / "gitops"


def rendered_model(cluster: Cluster, overlay: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(GITOPS / "overlays" / overlay)).stdout) if d]
    model: dict[str, Any] = next(d for d in docs if d["kind"] == "Phi3Model")
    return model


def test_gitops_overlays_apply_server_side(cluster: Cluster, crd: Cluster) -> None:
    existed = cluster.exists("namespace", "llm")
    # Never clobber a namespace `llm` that someone else uses (the demo does): dry-run there.
    mode = ["--dry-run=server"] if existed else []
    try:
        for overlay, target in (("cpu", "cpu"), ("cuda", "cuda")):
            proc = cluster.kubectl("apply", "--server-side", "--field-manager=gitops-test", *mode,
                                   "-k", str(GITOPS / "overlays" / overlay))
            assert "phi3model.phi3.ai/phi3-mini serverside-applied" in proc.stdout, proc.stdout
            model = rendered_model(cluster, overlay)
            assert model["metadata"]["namespace"] == "llm"
            assert model["spec"]["hardware"]["target"] == target
            if not existed:
                live = cluster.get("phi3", "phi3-mini", "llm")
                assert live["spec"]["hardware"]["target"] == target
                assert live["spec"]["generation"]["topP"] == 1.0  # CRD defaults applied
        if not existed:
            live = cluster.get("phi3", "phi3-mini", "llm")
            assert live["spec"]["hardware"]["gpus"] == 1
            assert live["spec"]["autoscaling"]["maxReplicas"] == 3
    finally:
        if not existed:
            cluster.kubectl("delete", "namespace", "llm", "--wait=false", "--ignore-not-found")


def test_gitops_cuda_overlay_rejects_gpus_on_cpu(cluster: Cluster, crd: Cluster, namespace: str) -> None:
    # The CRD's CEL rules guard what overlays produce: gpus on a cpu target is refused at apply.
    model = rendered_model(cluster, "cuda")
    model["metadata"]["namespace"] = namespace
    model["spec"]["hardware"]["target"] = "cpu"
    proc = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", stdin=json.dumps(model),
                           check=False)
    assert proc.returncode != 0
    assert "hardware.gpus is only allowed with target: cuda" in proc.stderr
