"""spec.network on the real node, with a real enforcer: kube-router as a NetworkPolicy firewall beside
kube-proxy (`hack/localcluster firewall up`). Pods in three namespaces call a served model through its
Service: the one spec.network admits reaches the serving port, another namespace is refused, and the
monitoring namespace (the operator's config.monitoring default) reaches only the metrics port. Without
spec.network the policy goes, and the refused namespace gets through: the refusal was the policy's. A real
Prometheus (images/prometheus, built from its Go module) scrapes the model from the monitoring namespace.
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from tests.support.cluster import REPO_ROOT, Cluster
from tests.support.realnode import RealPath, build_images, diagnose, on_real_node, ready_model, serving_pods
from tests.support.wait import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "np-model"
CALLERS_LABEL = {"phi3-test/callers": "yes"}
MONITORING_NAMESPACE = "monitoring"
# Each probe pod asks both ports until it gets an answer or PROBE_S pass: the enforcer adds a new pod's
# address to its allowed sets a moment after the pod starts, so a first refusal proves nothing.
PROBE_S = 25
PROBE = f"""
import json, sys, time, urllib.request
result = {{}}
deadline = time.monotonic() + {PROBE_S}
for name, url in (("serving", sys.argv[1]), ("metrics", sys.argv[2])):
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                result[name] = response.status
                break
        except Exception as error:
            result[name] = "refused: " + str(getattr(error, "reason", error))
        if time.monotonic() > deadline:
            break
        time.sleep(1)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def firewall(real_path: RealPath) -> Iterator[None]:
    localcluster = str(REPO_ROOT / "hack" / "localcluster")
    up = subprocess.run([localcluster, "firewall", "up"], capture_output=True, text=True, timeout=1200)
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        yield
    finally:
        subprocess.run([localcluster, "firewall", "down"], capture_output=True, text=True, timeout=300)


def probe_pod(name: str, image: str, serving_url: str, metrics_url: str) -> dict[str, Any]:
    """A pod on the real node that asks both URLs once and prints what it got."""
    placed = on_real_node({"spec": {"hardware": {}}})["spec"]["hardware"]
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": placed["nodeSelector"], "tolerations": placed["tolerations"],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "probe", "image": image, "command": ["python", "-c", PROBE, serving_url, metrics_url],
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
            }],
        },
    }


def reachability(cluster: Cluster, namespaces: dict[str, str], image: str, service: dict[str, Any],
                 round_name: str) -> dict[str, dict[str, Any]]:
    """What a pod in each namespace reaches through the model's Service: {caller: {serving, metrics}}."""
    ip = service["spec"]["clusterIP"]
    serving_url = f"http://{ip}:8080/v2/models/{MODEL}/ready"
    metrics_url = f"http://{ip}:8082/metrics"
    for namespace in namespaces.values():
        cluster.apply(probe_pod(f"probe-{round_name}", image, serving_url, metrics_url), namespace)

    def finished(namespace: str) -> str | None:
        pod = cluster.get("pod", f"probe-{round_name}", namespace)
        phase = pod.get("status", {}).get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    seen = {}
    for caller, namespace in namespaces.items():
        phase = wait_until(lambda namespace=namespace: finished(namespace), timeout=180 + 2 * PROBE_S, interval=2,
                           message=f"the {caller} probe pod to finish")
        logs = cluster.kubectl("logs", f"probe-{round_name}", "-n", namespace).stdout.strip()
        assert phase == "Succeeded", logs
        seen[caller] = json.loads(logs.splitlines()[-1])
    return seen


def prometheus_scrape(cluster: Cluster, service_ip: str) -> str:
    """Run Prometheus (images/prometheus) in the monitoring namespace on the model's metrics port until it
    reports the target up with the runtime's own series; returns what it saw."""
    image = build_images("prometheus")["prometheus"]
    config = {"global": {"scrape_interval": "2s", "scrape_timeout": "1s"},
              "scrape_configs": [{"job_name": "phi3", "static_configs": [{"targets": [f"{service_ip}:8082"]}]}]}
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "prometheus"},
                   "data": {"prometheus.yml": yaml.safe_dump(config)}}, MONITORING_NAMESPACE)
    pod = probe_pod("prometheus", image, "", "")
    container = pod["spec"]["containers"][0]
    del container["command"]
    container["args"] = ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/tmp/prometheus"]
    container["resources"]["limits"]["memory"] = "512Mi"
    container["volumeMounts"] = [{"name": "config", "mountPath": "/etc/prometheus"},
                                 {"name": "tmp", "mountPath": "/tmp"}]
    pod["spec"]["restartPolicy"] = "Always"
    pod["spec"]["volumes"] = [{"name": "config", "configMap": {"name": "prometheus"}}, {"name": "tmp", "emptyDir": {}}]
    cluster.apply(pod, MONITORING_NAMESPACE)

    def query(expression: str) -> list[dict[str, Any]]:
        ip = cluster.get("pod", "prometheus", MONITORING_NAMESPACE).get("status", {}).get("podIP")
        if not ip:
            return []
        url = f"http://{ip}:9090/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                result: list[dict[str, Any]] = json.loads(response.read())["data"]["result"]
                return result
        except OSError:
            return []

    up = wait_until(lambda: [r for r in query('up{job="phi3"}') if r["value"][1] == "1"], timeout=240, interval=3,
                    message="Prometheus in the monitoring namespace to scrape the model")
    running = wait_until(lambda: query('phi3_requests_running{job="phi3"}'), timeout=60, interval=3,
                         message="the runtime's series in Prometheus")
    return f"up={up[0]['value'][1]} phi3_requests_running={running[0]['value'][1]}"


def test_network_policy_admits_the_named_peers_and_monitoring_only(real_path: RealPath, firewall: None) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    image = real_path.images["mlserver-cpu"]
    callers = cluster.create_namespace("phi3-np-callers")
    cluster.kubectl("label", "namespace", callers, *(f"{k}={v}" for k, v in CALLERS_LABEL.items()))
    others = cluster.create_namespace("phi3-np-others")
    created_monitoring = cluster.kubectl("create", "namespace", MONITORING_NAMESPACE, check=False).returncode == 0
    try:
        uri = real_path.package(MODEL)
        manifest = real_path.manifest(MODEL, uri, network={"allowFrom": [{"namespaceSelector": {
            "matchLabels": CALLERS_LABEL}}]})
        cluster.apply(manifest, namespace)
        try:
            wait_until(lambda: ready_model(cluster, MODEL, namespace), timeout=420, interval=2,
                       message=f"{MODEL} to be Ready behind its NetworkPolicy")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{diagnose(cluster, namespace, real_path.operator)}") from None
        policy = cluster.get("networkpolicy", MODEL, namespace)
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        service = cluster.get("service", MODEL, namespace)
        namespaces = {"callers": callers, "others": others, "monitoring": MONITORING_NAMESPACE}

        seen = reachability(cluster, namespaces, image, service, "enforced")
        print(f"NetworkPolicy matrix (enforced): {json.dumps(seen)}")
        assert seen["callers"]["serving"] == 200, seen
        assert str(seen["callers"]["metrics"]).startswith("refused"), seen
        assert str(seen["others"]["serving"]).startswith("refused"), seen
        assert str(seen["others"]["metrics"]).startswith("refused"), seen
        assert str(seen["monitoring"]["serving"]).startswith("refused"), seen
        assert seen["monitoring"]["metrics"] == 200, seen
        # A real Prometheus in the monitoring namespace scrapes the model's metrics through the policy.
        scraped = prometheus_scrape(cluster, service["spec"]["clusterIP"])
        print(f"Prometheus in {MONITORING_NAMESPACE}: {scraped}")
        # The kubelet's probes come from the node itself, which policies do not cut off: still Ready.
        assert ready_model(cluster, MODEL, namespace)
        assert all(any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"]["conditions"])
                   for p in serving_pods(cluster, MODEL, namespace))

        # Without spec.network the operator deletes the policy, and everyone gets through again.
        cluster.kubectl("patch", "phi3", MODEL, "-n", namespace, "--type=json",
                        "-p", json.dumps([{"op": "remove", "path": "/spec/network"}]))
        wait_until(lambda: cluster.kubectl("get", "networkpolicy", MODEL, "-n", namespace, check=False).returncode != 0,
                   timeout=120, interval=2, message="the NetworkPolicy to be deleted")
        opened = reachability(cluster, {"others": others}, image, service, "open")
        print(f"NetworkPolicy matrix (no policy): {json.dumps(opened)}")
        assert opened["others"] == {"serving": 200, "metrics": 200}, opened
    finally:
        cluster.kubectl("delete", "phi3", MODEL, "-n", namespace, "--wait=false", check=False)
        for name in (callers, others, *([MONITORING_NAMESPACE] if created_monitoring else [])):
            cluster.delete_namespace(name)
