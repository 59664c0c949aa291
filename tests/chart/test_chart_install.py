"""The chart against the local control plane: server dry-run, helm install, and RBAC that a real
operator process, authenticated as the chart's ServiceAccount, needs and no more."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.helpers import CHART_DIR, AuditLog, Helm, Releases, argocd_health, token_kubeconfig
from tests.support.cluster import Cluster
from tests.support.operator import OperatorProcess, operator_env
from tests.support.wait import wait_until

pytestmark = pytest.mark.cluster


def render(helm: Helm, namespace: str, *values: str) -> str:
    return helm.run("template", "phi3", str(CHART_DIR), "--namespace", namespace, *values).stdout


def service_account_token(cluster: Cluster, namespace: str, service_account: str) -> str:
    return cluster.kubectl("create", "token", service_account, "-n", namespace, "--duration", "1h").stdout.strip()


def can_i(as_sa: Cluster, verb: str, resource: str, namespace: str | None) -> bool:
    """`resource` may name a subresource as `plural.group/sub`; `can-i` would read `/sub` as an object name."""
    resource, _, subresource = resource.partition("/")
    args = ["auth", "can-i", verb, resource] + (["--subresource", subresource] if subresource else [])
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    proc = as_sa.kubectl(*args, check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i {verb} {resource}: {proc.stdout} {proc.stderr}"
    return answer == "yes"


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((dict(c) for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


@pytest.mark.parametrize(
    "values",
    [(), ("--set", "rbac.scope=namespace"), ("--set", "metrics.service.enabled=false", "--set", "verbose=true")],
    ids=["default", "namespaced", "no-metrics-service"],
)
def test_rendered_chart_passes_server_dry_run(
    cluster_helm: Helm, cluster: Cluster, namespace: str, values: tuple[str, ...]
) -> None:
    manifests = render(cluster_helm, namespace, *values)
    proc = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=manifests)
    assert "deployment.apps/phi3-phi3-operator created (server dry run)" in proc.stdout, proc.stdout
    assert "(server dry run)" in proc.stdout


def test_helm_install_creates_the_charts_objects(
    releases: Releases, cluster: Cluster, namespace: str, cluster_helm: Helm, tmp_path: Path
) -> None:
    releases.install("ops")
    name = "ops-phi3-operator"
    for kind, obj in (("serviceaccount", name), ("configmap", f"{name}-config"), ("deployment", name),
                      ("service", f"{name}-metrics")):
        assert cluster.exists(kind, obj, namespace), f"{kind}/{obj} missing"
    for kind in ("clusterrole", "clusterrolebinding"):
        assert cluster.exists(kind, f"{namespace}-{name}"), f"{kind}/{namespace}-{name} missing"
    assert cluster.exists("crd", "phi3models.phi3.ai")

    deployment = cluster.get("deployment", name, namespace)
    assert deployment["status"].get("availableReplicas") == 2  # helm --wait returned: both replicas are Ready
    config = yaml.safe_load(cluster.get("configmap", f"{name}-config", namespace)["data"]["config.yaml"])
    assert config["defaultTrackingUri"] == "http://mlflow.mlflow.svc:5000"

    status = cluster_helm.run("status", "ops", "--namespace", namespace).stdout
    assert "STATUS: deployed" in status
    assert "kubectl apply --server-side -f crds/" in status  # NOTES.txt
    assert "examples/phi3-cpu.yaml" in status

    # Cluster scope: the ServiceAccount reads Phi3Models everywhere, and may not delete them. (Knative's kinds
    # are not installed here: `can-i` cannot name them; test_chart_render checks those rules exactly.)
    token = service_account_token(cluster, namespace, name)
    as_sa = Cluster(kubeconfig=token_kubeconfig(cluster, token, tmp_path / "token.kubeconfig"))
    assert can_i(as_sa, "watch", "phi3models.phi3.ai", None)
    assert can_i(as_sa, "patch", "deployments.apps", "default")
    assert not can_i(as_sa, "delete", "phi3models.phi3.ai", "default")
    assert not can_i(as_sa, "list", "secrets", "default")
    assert not can_i(as_sa, "list", "namespaces", None)


def test_operator_runs_on_the_charts_namespaced_rbac(
    releases: Releases,
    cluster: Cluster,
    namespace: str,
    *,
    pyfunc_model_uri: str,
    lua: str,
    tmp_path: Path,
) -> None:
    """The real operator, as the chart's ServiceAccount, gets a Phi3Model to Ready; what it is not
    granted is refused."""
    releases.install("ops", "--set", "rbac.scope=namespace", "--set", f"watchNamespaces={{{namespace}}}")
    name = "ops-phi3-operator"
    assert cluster.exists("role", name, namespace) and cluster.exists("rolebinding", name, namespace)
    token = service_account_token(cluster, namespace, name)
    as_sa = Cluster(kubeconfig=token_kubeconfig(cluster, token, tmp_path / "token.kubeconfig"))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cluster.get("configmap", f"{name}-config", namespace)["data"]["config.yaml"])

    operator = OperatorProcess(
        cluster=as_sa,
        log_path=tmp_path / "operator.log",
        extra_env={**operator_env(resync_s=3.0, refresh_s=3.0), "PHI3_OPERATOR_CONFIG": str(config_file)},
        # As the chart runs it: the Role the chart grants for the leader Lease must be enough.
        args=("--namespace", namespace, "--leader-election-namespace", namespace),
    )
    model = yaml.safe_load((Path(__file__).parents[2] / "examples" / "phi3-cpu.yaml").read_text())
    model["spec"]["model"]["uri"] = pyfunc_model_uri
    audit = AuditLog(cluster)
    operator.start()
    try:
        cluster.apply(model, namespace)

        def ready() -> dict[str, Any] | None:
            assert operator.alive(), f"operator exited:\n{operator.log()}"
            obj: dict[str, Any] = cluster.get("phi3", "phi3-mini", namespace)
            fresh = obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]
            return obj if fresh and condition(obj, "Ready").get("status") == "True" else None

        obj = wait_until(ready, timeout=90, message=f"{namespace}/phi3-mini to be Ready")
        assert obj is not None
        assert cluster.exists("deployment", "phi3-mini", namespace)
        assert cluster.exists("service", "phi3-mini", namespace)
        assert condition(obj, "ImageReady")["message"] == "using ghcr.io/phi3-operator/mlserver-cpu:0.1.0"
        events = cluster.get("events", namespace=namespace)["items"]
        assert any(e.get("source", {}).get("component") == "phi3-operator" and e["reason"] == "Applied"
                   for e in events), "the operator recorded no events"
        assert argocd_health(lua, obj) == ("Healthy", "The model is served and all replicas are ready")

        # The operator served the object (its resync timer runs every 3 s), and nothing it asked was refused.
        passes = operator.log().count(" models in ")
        wait_until(lambda: operator.log().count(" models in ") > passes, timeout=30,
                   message="a resync pass over the object")
        log = operator.log()
        assert "403" not in log and "Forbidden" not in log, log

        # The API server's audit log: every write as the ServiceAccount was allowed, by the chart's RBAC.
        user = f"system:serviceaccount:{namespace}:{name}"
        writes = audit.writes(namespace)
        ours = [w for w in writes if w.user == user]
        assert all(w.decision == "allow" and w.code < 400 for w in ours), ours
        # Another, cluster-wide operator (a parallel test session on the same control plane) may
        # race ours to the same writes and leave it nothing to write. Where none did, ours made them all.
        writers = {w.user for w in writes if w.resource in ("deployments", "services", "phi3models/status")}
        assert writers, f"nobody wrote the children: {writes}"
        if writers == {user}:
            written = {(w.verb, w.resource) for w in ours}
            assert {("patch", "deployments"), ("patch", "services"), ("patch", "phi3models/status"),
                    ("create", "events")} <= written, written

        # Real writes with the token, whatever the race: server-side apply creates a Deployment.
        probe = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "rbac-probe"},
                 "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "rbac-probe"}},
                          "template": {"metadata": {"labels": {"app": "rbac-probe"}},
                                       "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}
        as_sa.apply(probe, namespace)
        as_sa.kubectl("patch", "phi3", "phi3-mini", "-n", namespace, "--subresource=status", "--type=merge",
                      "-p", json.dumps({"status": {"phase": obj["status"]["phase"]}}))

        # What the Role grants, the ServiceAccount can do; nothing else.
        granted = [("get", "phi3models.phi3.ai"), ("patch", "phi3models.phi3.ai/status"),
                   ("create", "deployments.apps"), ("patch", "services"),
                   ("delete", "horizontalpodautoscalers.autoscaling"), ("get", "secrets"),
                   ("create", "events"), ("create", "jobs.batch"), ("delete", "deployments.apps")]
        for verb, resource in granted:
            assert can_i(as_sa, verb, resource, namespace), f"{verb} {resource} should be granted"
        refused = [("create", "pods", namespace), ("delete", "phi3models.phi3.ai", namespace),
                   ("patch", "phi3models.phi3.ai", namespace),
                   ("list", "secrets", namespace), ("delete", "configmaps", namespace),
                   ("update", "deployments.apps", namespace), ("get", "secrets", "default"),
                   ("create", "deployments.apps", "default"), ("get", "phi3models.phi3.ai", "default"),
                   ("get", "namespaces", namespace), ("create", "customresourcedefinitions.apiextensions.k8s.io", None),
                   ("create", "roles.rbac.authorization.k8s.io", namespace)]
        for verb, resource, ns in refused:
            assert not can_i(as_sa, verb, resource, ns), f"{verb} {resource} in {ns or 'all namespaces'} is granted"

        # And a real request with the token is refused by the API server.
        proc = as_sa.kubectl("delete", "phi3", "phi3-mini", "-n", namespace, "--wait=false", check=False)
        assert proc.returncode != 0 and "Forbidden" in proc.stderr, proc.stderr
        assert cluster.exists("phi3", "phi3-mini", namespace)
        proc = as_sa.kubectl("delete", "configmap", "--all", "-n", namespace, "--wait=false", check=False)
        assert proc.returncode != 0 and "Forbidden" in proc.stderr, proc.stderr
        proc = as_sa.kubectl("get", "secrets", "-n", "default", check=False)
        assert proc.returncode != 0 and "Forbidden" in proc.stderr, proc.stderr
    finally:
        operator.stop()
        cluster.kubectl("delete", "phi3", "phi3-mini", "-n", namespace, "--ignore-not-found", "--wait=false")
