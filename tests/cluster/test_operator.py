"""The operator core against the local control plane and a real operator process."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.cluster import REPO_ROOT, Cluster
from tests.support.operator import OperatorProcess, is_operator_agent
from tests.support.wait import wait_until

pytestmark = pytest.mark.cluster

EXAMPLES = REPO_ROOT / "examples"
RESYNC_PASS = " models in "  # the operator's log line for one periodic pass over all models


def example(name: str, model_uri: str) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    manifest["spec"]["model"]["uri"] = model_uri
    return manifest


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == type_:
            return dict(cond)
    return {}


def wait_ready(cluster: Cluster, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        obj = cluster.get("phi3", name, namespace)
        fresh = obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]
        return obj if fresh and condition(obj, "Ready").get("status") == "True" else None

    result: dict[str, Any] = wait_until(ready, timeout=timeout, message=f"{namespace}/{name} to be Ready")
    return result


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    pod = deployment["spec"]["template"]["spec"]
    found: dict[str, Any] = next(c for c in pod.get("initContainers", []) + pod["containers"] if c["name"] == name)
    return found


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in c.get("env", [])}


def test_cpu_model_gets_deployment_service_and_ready_status(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pyfunc_model_uri: str
) -> None:
    cluster.apply(example("phi3-cpu.yaml", pyfunc_model_uri), namespace)
    obj = wait_ready(cluster, namespace, "phi3-mini")

    deployment = cluster.get("deployment", "phi3-mini", namespace)
    runtime = container(deployment, "runtime")
    fetch = container(deployment, "fetch-model")
    assert runtime["image"].endswith("mlserver-cpu:0.1.0")
    assert runtime["command"][:2] == ["phi3-operator", "serve"]
    assert fetch["command"] == ["phi3-operator", "fetch", "--model-uri", pyfunc_model_uri, "--dest", "/models/model"]
    assert {p["containerPort"] for p in runtime["ports"]} == {8080, 8081, 8082}
    assert runtime["readinessProbe"]["httpGet"]["path"] == "/v2/models/phi3-mini/ready"
    assert runtime["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert runtime["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    assert env_of(runtime)["PHI3_MAX_TOKENS"] == "256"
    pod_spec = deployment["spec"]["template"]["spec"]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in (runtime, fetch):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]

    service = cluster.get("service", "phi3-mini", namespace)
    assert [p["port"] for p in service["spec"]["ports"]] == [8080, 8081, 8082]

    status = obj["status"]
    assert status["phase"] == "Ready"
    assert status["replicas"] == 1 and status["readyReplicas"] == 1
    assert status["endpoint"]["url"] == f"http://phi3-mini.{namespace}.svc:8080"
    assert status["endpoint"]["chatCompletions"].endswith("/v1/chat/completions")
    assert status["endpoint"]["v2Infer"].endswith("/v2/models/phi3-mini/infer")
    assert status["model"]["resolvedUri"] == pyfunc_model_uri
    assert status["model"]["flavor"] == "pyfunc"
    for cond in status["conditions"]:
        assert cond["observedGeneration"] == obj["metadata"]["generation"]
        assert cond["lastTransitionTime"]
        assert cond["reason"][0].isupper() and " " not in cond["reason"]
    by_type = {c["type"]: c["status"] for c in status["conditions"]}
    # kstatus's pair: a served model is neither Reconciling nor Stalled (kstatus: Current).
    assert by_type == {"ModelResolved": "True", "ImageReady": "True", "ModelDelivered": "True", "Available": "True",
                       "Ready": "True", "Reconciling": "False", "Stalled": "False"}
    # No model registry in this operator's config: every pod downloads the model (Auto -> Download).
    assert status["delivery"]["mode"] == "Download"
    delivered = next(c for c in status["conditions"] if c["type"] == "ModelDelivered")
    assert delivered["reason"] == "PerPodDownload" and "no model registry" in delivered["message"]

    table = cluster.kubectl("get", "phi3", "phi3-mini", "-n", namespace).stdout
    assert table.split("\n")[0].split() == ["NAME", "TARGET", "MODEL", "VERSION", "PHASE", "READY", "AGE"]
    assert "Ready" in table and "1/1" in table

    events = cluster.get("events", namespace=namespace)["items"]
    assert any(e["reason"] == "Applied" and e["involvedObject"]["name"] == "phi3-mini" for e in events)


def test_cuda_model_lands_on_gpu_node_with_hpa_and_pdb(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pyfunc_model_uri: str
) -> None:
    cluster.apply(example("phi3-cuda.yaml", pyfunc_model_uri), namespace)
    wait_ready(cluster, namespace, "phi3-mini-cuda")

    deployment = cluster.get("deployment", "phi3-mini-cuda", namespace, managed_fields=True)
    runtime = container(deployment, "runtime")
    assert runtime["image"].endswith("mlserver-cuda:0.1.0")
    assert runtime["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env_of(runtime)["PHI3_ONNX_VARIANT"] == "cuda-int4"
    pod_spec = deployment["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec["tolerations"]
    assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}

    pods = cluster.get("pods", namespace=namespace)["items"]
    assert pods and all(p["spec"]["nodeName"] == "kwok-gpu-0" for p in pods)

    hpa = cluster.get("hpa", "phi3-mini-cuda", namespace)
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 3)
    managed = [f for f in deployment["metadata"]["managedFields"] if f["manager"] == "phi3-operator"]
    assert managed and all("f:replicas" not in json.dumps(f.get("fieldsV1", {})) for f in managed), (
        "with autoscaling, replicas belongs to the HPA"
    )
    assert cluster.get("pdb", "phi3-mini-cuda", namespace)["spec"]["maxUnavailable"] == 1


def test_mig_resource_name_is_requested(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pyfunc_model_uri: str
) -> None:
    manifest = example("phi3-cuda.yaml", pyfunc_model_uri)
    manifest["metadata"]["name"] = "phi3-mig"
    manifest["spec"]["hardware"].update({"gpus": 2, "gpuResourceName": "nvidia.com/mig-1g.10gb"})
    cluster.apply(manifest, namespace)
    deployment = wait_until(lambda: cluster.get("deployments", namespace=namespace)["items"], timeout=30,
                            message="the MIG deployment")[0]
    assert container(deployment, "runtime")["resources"]["limits"]["nvidia.com/mig-1g.10gb"] == "2"


def test_spec_edits_propagate_and_observed_generation_follows(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pyfunc_model_uri: str
) -> None:
    cluster.apply(example("phi3-cpu.yaml", pyfunc_model_uri), namespace)
    first = wait_ready(cluster, namespace, "phi3-mini")

    cluster.kubectl("patch", "phi3", "phi3-mini", "-n", namespace, "--type=merge",
                    "-p", '{"spec": {"replicas": 3, "generation": {"maxTokens": 64}}}')
    second = wait_ready(cluster, namespace, "phi3-mini")
    assert second["metadata"]["generation"] == first["metadata"]["generation"] + 1
    assert second["status"]["observedGeneration"] == second["metadata"]["generation"]
    wait_until(lambda: cluster.get("phi3", "phi3-mini", namespace)["status"]["readyReplicas"] == 3, timeout=60,
               message="3 ready replicas in status")
    deployment = cluster.get("deployment", "phi3-mini", namespace)
    assert deployment["spec"]["replicas"] == 3
    assert env_of(container(deployment, "runtime"))["PHI3_MAX_TOKENS"] == "64"


def test_drift_is_repaired(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pyfunc_model_uri: str
) -> None:
    cluster.apply(example("phi3-cpu.yaml", pyfunc_model_uri), namespace)
    wait_ready(cluster, namespace, "phi3-mini")
    original_image = container(cluster.get("deployment", "phi3-mini", namespace), "runtime")["image"]

    cluster.kubectl("delete", "service", "phi3-mini", "-n", namespace)
    cluster.kubectl("set", "image", "deployment/phi3-mini", "runtime=evil:latest", "-n", namespace)
    # Resync runs every 3 s in this operator; a repair within a few intervals is within one default 60 s one.
    wait_until(lambda: cluster.exists("service", "phi3-mini", namespace), timeout=30,
               message="the deleted Service to come back")
    wait_until(
        lambda: container(cluster.get("deployment", "phi3-mini", namespace), "runtime")["image"] == original_image,
        timeout=30,
        message="the hand-edited image to be restored",
    )


def test_deleting_the_model_removes_its_children(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pyfunc_model_uri: str
) -> None:
    manifest = example("phi3-cuda.yaml", pyfunc_model_uri)
    cluster.apply(manifest, namespace)
    wait_ready(cluster, namespace, "phi3-mini-cuda")
    cluster.kubectl("delete", "phi3", "phi3-mini-cuda", "-n", namespace)
    for kind in ("deployment", "service", "hpa", "pdb"):
        wait_until(lambda k=kind: not cluster.exists(k, "phi3-mini-cuda", namespace), timeout=60,
                   message=f"the {kind} to be garbage-collected")


def operator_writes(audit_log: Path, namespace: str, since_line: int) -> list[dict[str, Any]]:
    """Write requests in `namespace` made by our operator (kopf or the Kubernetes client), from the audit log."""
    writes = []
    with open(audit_log) as log:
        for number, line in enumerate(log):
            if number < since_line:
                continue
            entry = json.loads(line)
            agent = entry.get("userAgent", "")
            if entry["objectRef"].get("namespace") == namespace and is_operator_agent(agent):
                writes.append(entry)
    return writes


def test_noop_resync_makes_zero_writes(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pyfunc_model_uri: str
) -> None:
    audit_log = cluster.kubeconfig.parent / "audit.log"
    start = sum(1 for _ in open(audit_log))
    cluster.apply(example("phi3-cpu.yaml", pyfunc_model_uri), namespace)
    wait_ready(cluster, namespace, "phi3-mini")
    assert operator_writes(audit_log, namespace, start), "the audit log must see the operator's first writes"

    # "Nothing changed" is checked, not assumed: a window counts only if the Deployment (whose status
    # the operator rightly mirrors) kept its resourceVersion through it.
    def deployment_version() -> str:
        return str(cluster.get("deployment", "phi3-mini", namespace)["metadata"]["resourceVersion"])

    for _attempt in range(5):
        # The version is read before the quiet window starts: a Deployment status update (the controller's,
        # seconds after Ready) that lands between the window and this read would otherwise hide the
        # operator's legitimate answer to it.
        version = deployment_version()
        settled = wait_until(lambda: _quiet_since(audit_log, namespace), timeout=60,
                             message="the operator to stop writing after Ready")
        resyncs_before = operator.log().count(RESYNC_PASS)
        wait_until(lambda before=resyncs_before: operator.log().count(RESYNC_PASS) >= before + 3, timeout=30,
                   message="three more resync passes over every model")
        if deployment_version() == version:
            break
    else:
        pytest.fail("the Deployment kept changing; no quiet window to judge the resync by")
    writes = operator_writes(audit_log, namespace, settled)
    assert writes == [], [
        (w["verb"], w["objectRef"].get("resource"), w["objectRef"].get("subresource"), w["objectRef"].get("name"),
         w.get("userAgent"), w.get("requestReceivedTimestamp")) for w in writes
    ]


def _quiet_since(audit_log: Path, namespace: str) -> int | None:
    """The audit line count, once 4 s (more than one resync interval) have passed without operator writes."""
    import time

    mark = sum(1 for _ in open(audit_log))
    time.sleep(4)
    return mark if not operator_writes(audit_log, namespace, mark) else None


BAD_SPECS = [
    ({"hardware": {"target": "cpu", "gpus": 1}}, "hardware.gpus is only allowed with target: cuda"),
    ({"hardware": {"target": "cuda", "gpus": 0}}, "should be greater than or equal to 1"),
    ({"hardware": {"target": "tpu"}}, 'Unsupported value: "tpu"'),
    ({"model": {"uri": "ftp://example.com/model"}}, "model.uri must be models:/NAME/VERSION"),
    ({"model": {"uri": "models:/no-version"}}, "model.uri must be models:/NAME/VERSION"),
    ({"replicas": -1}, "should be greater than or equal to 0"),
    ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas must be less than or equal to"),
    ({"autoscaling": {"targetRequestsPerReplica": 0}}, "should be greater than or equal to 1"),
    ({"autoscaling": {"minReplicas": 0, "metric": "CPU"}}, "minReplicas: 0 needs metric RequestsPerReplica"),
    ({"autoscaling": {"metric": "GPU"}}, 'Unsupported value: "GPU"'),
    ({"image": {"policy": "Sometimes"}}, 'Unsupported value: "Sometimes"'),
    ({"disruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}}, "exactly one of minAvailable or maxUnavailable"),
    ({"service": {"port": 70000}}, "should be less than or equal to 65535"),
    ({"generation": {"temperature": 3}}, "should be less than or equal to 2"),
    ({"hardware": {"target": "cuda", "gpuResourceName": "gpu"}}, "must be a domain-prefixed resource name"),
    ({"model": {"trackingUri": "mlflow:5000"}}, "model.trackingUri must be an http(s)://"),
]


@pytest.mark.parametrize(("patch", "message"), BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_invalid_spec_is_rejected_at_apply(crd: Cluster, namespace: str, patch: dict[str, Any], message: str) -> None:
    manifest = example("phi3-cpu.yaml", "models:/phi3-mini@champion")
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(manifest["spec"].get(key), dict):
            manifest["spec"][key] = {**manifest["spec"][key], **value}
        else:
            manifest["spec"][key] = value
    result = crd.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest), check=False)
    assert result.returncode != 0, f"accepted: {patch}"
    assert message in result.stderr, result.stderr


def test_missing_field_is_rejected(crd: Cluster, namespace: str) -> None:
    manifest = example("phi3-cpu.yaml", "models:/phi3-mini@champion")
    del manifest["spec"]["hardware"]
    result = crd.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(manifest), check=False)
    assert result.returncode != 0
    assert "spec.hardware: Required value" in result.stderr


def test_scale_to_zero_without_knative_is_a_condition_and_the_hpa_serves(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pyfunc_model_uri: str
) -> None:
    manifest = example("phi3-cpu.yaml", pyfunc_model_uri)
    manifest["spec"]["autoscaling"] = {"minReplicas": 0, "maxReplicas": 3}
    cluster.apply(manifest, namespace)
    obj = wait_ready(cluster, namespace, "phi3-mini")
    elastic = condition(obj, "ElasticServing")
    assert (elastic["status"], elastic["reason"]) == ("False", "KnativeMissing"), elastic
    assert "need Knative Serving" in elastic["message"]
    hpa = cluster.get("hpa", "phi3-mini", namespace)
    assert hpa["spec"]["minReplicas"] == 1 and hpa["spec"]["maxReplicas"] == 3


def test_unreachable_mlflow_is_a_condition_not_a_crash(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    manifest = example("phi3-cpu.yaml", "models:/phi3-mini@champion")
    # Nothing listens on port 9 of loopback: connection refused, at once.
    manifest["spec"]["model"]["trackingUri"] = "http://127.0.0.1:9"
    cluster.apply(manifest, namespace)

    def failed() -> dict[str, Any] | None:
        obj = cluster.get("phi3", "phi3-mini", namespace)
        return obj if condition(obj, "Ready").get("reason") == "MLflowUnavailable" else None

    obj = wait_until(failed, timeout=60, message="Ready=False with reason MLflowUnavailable")
    ready = condition(obj, "Ready")
    assert ready["status"] == "False"
    assert "127.0.0.1:9" in ready["message"]
    assert obj["status"]["phase"] == "Pending"
    assert not cluster.exists("deployment", "phi3-mini", namespace)
    assert operator.alive()
    events = cluster.get("events", namespace=namespace)["items"]
    warnings = [e for e in events if e["reason"] == "MLflowUnavailable"]
    assert len(warnings) == 1, "a persisting failure is reported once, not on every retry"


def test_operator_restart_mid_reconcile_converges(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pyfunc_model_uri: str
) -> None:
    operator.stop()
    cluster.apply(example("phi3-cpu.yaml", pyfunc_model_uri), namespace)
    operator.start()
    # Kill it as soon as it has written the first child, before it could write status.
    wait_until(lambda: cluster.exists("deployment", "phi3-mini", namespace), timeout=60, interval=0.05,
               message="the first child")
    operator.stop(signal.SIGKILL)
    operator.start()
    wait_ready(cluster, namespace, "phi3-mini")
    assert cluster.exists("service", "phi3-mini", namespace)


def test_metrics_endpoint_counts_what_the_operator_did(
    cluster: Cluster, operator: OperatorProcess, namespace: str, pyfunc_model_uri: str
) -> None:
    import urllib.request

    address = operator.args[operator.args.index("--metrics-address") + 1]

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    # Another test may just have restarted the operator: wait for its metrics server.
    before = wait_until(scrape, timeout=60, message="the metrics endpoint")
    cluster.apply(example("phi3-cpu.yaml", pyfunc_model_uri), namespace)
    wait_ready(cluster, namespace, "phi3-mini")
    after = wait_until(lambda: (m := scrape())["phi3_operator_resync_passes_total"] > before.get(
        "phi3_operator_resync_passes_total", 0) and m, timeout=30, message="a resync pass in the metrics")
    ok = 'phi3_operator_reconciles_total{outcome="ok"}'
    assert after[ok] > before.get(ok, 0)
    applied = 'phi3_operator_applied_total{kind="Deployment"}'
    assert after[applied] >= before.get(applied, 0) + 1
    assert after["phi3_operator_models"] >= 1
