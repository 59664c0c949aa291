"""The product on a real node: our images run as pods under kubelet + containerd, and answer.

Everything here is real: the images are built from images/*/Dockerfile with buildah and pulled from
the local registry, the model is fetched from a real MLflow server by the pod's init container, and
the openai SDK talks to the Service's ClusterIP through kube-proxy. MLflow runs on the host, bound to
the node's bridge address, which the pods reach and nothing outside the machine does.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from typing import Any

import pytest
from tests.support.cluster import Cluster
from tests.support.realnode import (
    NODE_NAME,
    NODE_SELECTOR,
    NODE_TOLERATION,
    RealPath,
    containerd_socket,
    ctr_binary,
    diagnose,
    pod_start_phases,
    ready_model,
    service_base_url,
    serving_pods,
)
from tests.support.wait import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "tiny"
REFRESH_S = 3.0


def test_a_pod_on_the_real_node_has_logs_exec_dns_and_a_service(real_path: RealPath) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    image = real_path.images["mlserver-cpu"]
    script = ("import http.server, socketserver, os\n"
              "print('pod up', flush=True)\n"
              "http.server.HTTPServer((os.environ['POD_IP'], 8000), http.server.SimpleHTTPRequestHandler)"
              ".serve_forever()\n")
    cluster.apply([
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "web"}}, "spec": {
            "nodeSelector": NODE_SELECTOR, "tolerations": [NODE_TOLERATION],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "web", "image": image, "command": ["python", "-c", script], "workingDir": "/tmp",
                "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "readinessProbe": {"tcpSocket": {"port": 8000}, "periodSeconds": 1},
            }]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
         "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8000}]}},
    ], namespace)
    try:
        cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/web", "--timeout=300s", timeout=320)
        pod = cluster.get("pod", "web", namespace)
        assert pod["spec"]["nodeName"] == NODE_NAME
        assert pod["status"]["podIP"].startswith("10.88.0.")
        assert "pod up" in cluster.kubectl("logs", "-n", namespace, "web").stdout
        lookup = cluster.kubectl(
            "exec", "-n", namespace, "web", "--", "python", "-c",
            "import socket; print(socket.gethostbyname('kubernetes.default.svc.cluster.local'),"
            f" socket.gethostbyname('web.{namespace}.svc.cluster.local'))").stdout.split()
        service_ip = cluster.get("service", "web", namespace)["spec"]["clusterIP"]
        assert lookup == ["10.96.0.1", service_ip]
        # The API server through the `kubernetes` Service, from inside the pod.
        probe = cluster.kubectl(
            "exec", "-n", namespace, "web", "--", "python", "-c",
            "import ssl, urllib.request, urllib.error\n"
            "ctx = ssl._create_unverified_context()\n"
            "try:\n    urllib.request.urlopen('https://kubernetes.default.svc/version', context=ctx, timeout=5)\n"
            "except urllib.error.HTTPError as e:\n    print(e.code)\n").stdout.strip()
        assert probe in ("200", "401", "403", ""), probe
        import urllib.request

        def service_answers() -> bool:
            with urllib.request.urlopen(f"http://{service_ip}/", timeout=3) as response:
                return bool(response.status == 200)

        wait_until(service_answers, timeout=30, message="the ClusterIP to answer from the host")
    finally:
        cluster.kubectl("delete", "-n", namespace, "pod/web", "service/web", "--wait=false", check=False)


def test_a_phi3model_serves_chat_and_streams_from_a_real_pod(real_path: RealPath) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    uri = real_path.package(MODEL)
    cluster.apply(real_path.manifest(MODEL, f"models:/{MODEL}@champion"), namespace)
    try:
        obj = wait_until(lambda: ready_model(cluster, MODEL, namespace), timeout=420, interval=2,
                         message="the Phi3Model to be Ready on the real node")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(cluster, namespace, real_path.operator)}") from None
    assert obj["status"]["model"]["resolvedUri"] == uri
    pods = serving_pods(cluster, MODEL, namespace)
    assert [p["spec"]["nodeName"] for p in pods] == [NODE_NAME]
    fetch = pods[0]["status"]["initContainerStatuses"][0]
    assert fetch["state"]["terminated"]["exitCode"] == 0
    phases = pod_start_phases(pods[0])
    print(f"pod start (s from creation): {json.dumps(phases)}")
    assert phases["scheduled"] <= phases["fetched"] <= phases["ready"]

    from openai import OpenAI

    base = service_base_url(cluster, MODEL, namespace)
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    started = time.monotonic()
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert answer.choices[0].message.content
    pieces = []
    first_token_s = None
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=8, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            first_token_s = first_token_s or time.monotonic() - started
            pieces.append(chunk.choices[0].delta.content)
    assert pieces, "the stream carried no tokens"
    print(f"first streamed token through the Service: {first_token_s:.3f}s")

    # MLflow's payloads go through mlflow-skinny's own scoring parser, which is all the image carries of MLflow.
    chat = [{"role": "user", "content": "Hi"}]
    records = [{"messages": chat, "max_tokens": 3}, {"messages": chat, "max_tokens": 2}]
    request = urllib.request.Request(f"{base}/invocations", data=json.dumps({"dataframe_records": records}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        predictions = json.loads(response.read())["predictions"]
    assert [prediction["object"] for prediction in predictions] == ["chat.completion"] * 2


def stream_until(client: Any, stop: threading.Event, outcomes: list[str]) -> None:
    """Streaming chat requests back to back; each ends as 'ok' or what went wrong. A stream is whole
    when its last chunk carries a finish_reason (random weights may well finish at once, with no text)."""
    while not stop.is_set():
        try:
            finish_reason = None
            for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}],
                                                        max_tokens=16, stream=True):
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish_reason = chunk.choices[0].finish_reason
            outcomes.append("ok" if finish_reason in ("stop", "length") else f"cut short ({finish_reason})")
        except Exception as error:
            outcomes.append(f"{type(error).__name__}: {error}")


def test_moving_the_alias_rolls_to_a_new_pod_without_a_failed_request(real_path: RealPath) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    if not cluster.exists("phi3", MODEL, namespace):
        test_a_phi3model_serves_chat_and_streams_from_a_real_pod(real_path)
    old_pods = {p["metadata"]["name"] for p in serving_pods(cluster, MODEL, namespace)}
    from openai import OpenAI

    client = OpenAI(base_url=f"{service_base_url(cluster, MODEL, namespace)}/v1", api_key="unused",
                    max_retries=0, timeout=60)
    stop = threading.Event()
    outcomes: list[str] = []
    clients = [threading.Thread(target=stream_until, args=(client, stop, outcomes)) for _ in range(2)]
    for thread in clients:
        thread.start()
    try:
        new_uri = real_path.package(MODEL)

        def rolled() -> dict[str, Any] | None:
            obj = ready_model(cluster, MODEL, namespace)
            if not obj or obj["status"]["model"]["resolvedUri"] != new_uri:
                return None
            pods = serving_pods(cluster, MODEL, namespace)
            names = {p["metadata"]["name"] for p in pods}
            return obj if names and not names & old_pods else None

        try:
            wait_until(rolled, timeout=420, interval=2, message=f"the rollout to {new_uri}")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{diagnose(cluster, namespace, real_path.operator)}") from None
        time.sleep(3)  # requests keep flowing to the new pod alone for a moment
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
    failed = [o for o in outcomes if o != "ok"]
    print(f"alias rollout: {len(outcomes)} streaming requests, {len(failed)} failed")
    assert outcomes and not failed, failed[:5]
    pod = serving_pods(cluster, MODEL, namespace)[0]
    assert pod["metadata"]["annotations"]["phi3.ai/model-uri"] == new_uri


def condition(cluster: Cluster, name: str, namespace: str, kind: str = "Ready") -> dict[str, Any]:
    status = cluster.get("phi3", name, namespace).get("status", {})
    found: dict[str, Any] = next((c for c in status.get("conditions", []) if c["type"] == kind), {})
    return found


def test_a_killed_runtime_restarts_and_readiness_keeps_traffic_off_it(real_path: RealPath) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    if not cluster.exists("phi3", MODEL, namespace):
        test_a_phi3model_serves_chat_and_streams_from_a_real_pod(real_path)
    wait_until(lambda: ready_model(cluster, MODEL, namespace), timeout=300, interval=2, message="Ready")
    pod = next(p for p in serving_pods(cluster, MODEL, namespace) if not p["metadata"].get("deletionTimestamp"))
    name = pod["metadata"]["name"]
    runtime = next(s for s in pod["status"]["containerStatuses"] if s["name"] == "runtime")
    restarts = runtime["restartCount"]
    container_id = runtime["containerID"].split("://", 1)[1]
    # SIGKILL the serving process from the node, as the kernel or a crash would end it.
    killed = subprocess.run([ctr_binary(), f"--address={containerd_socket(cluster)}", "-n", "k8s.io", "tasks",
                             "kill", "--signal", "SIGKILL", container_id], text=True, capture_output=True)
    assert killed.returncode == 0, killed.stderr

    def endpoint_ready() -> bool | None:
        slices = cluster.get("endpointslices", namespace=namespace)["items"]
        endpoints = [e for s in slices if s["metadata"]["labels"].get("kubernetes.io/service-name") == MODEL
                     for e in s.get("endpoints", []) if e.get("targetRef", {}).get("name") == name]
        return bool(endpoints) and all(e["conditions"].get("ready") for e in endpoints)

    wait_until(lambda: endpoint_ready() is False, timeout=60, interval=0.5,
               message="the killed pod's endpoint to be marked not ready")

    def restarted() -> bool:
        status = next(s for s in cluster.get("pod", name, namespace)["status"]["containerStatuses"]
                      if s["name"] == "runtime")
        return bool(status["restartCount"] > restarts and status.get("ready"))

    wait_until(restarted, timeout=300, interval=1, message="the runtime container to restart and be ready")
    wait_until(endpoint_ready, timeout=60, interval=0.5, message="the endpoint to be ready again")
    from openai import OpenAI

    client = OpenAI(base_url=f"{service_base_url(cluster, MODEL, namespace)}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "back?"}], max_tokens=4)
    assert answer.choices[0].message.content is not None


def test_a_memory_limit_below_the_models_need_is_reported_as_oomkilled(real_path: RealPath) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    uri = real_path.package("tiny-oom")
    manifest = real_path.manifest("tiny-oom", uri,
                              resources={"requests": {"cpu": "100m", "memory": "64Mi"},
                                         "limits": {"memory": "100Mi"}})
    cluster.apply(manifest, namespace)
    try:
        def oom_reported() -> dict[str, Any] | None:
            found = condition(cluster, "tiny-oom", namespace, "Available")
            return found if found.get("reason") == "OOMKilled" else None

        try:
            found = wait_until(oom_reported, timeout=300, interval=2, message="Available=False reason OOMKilled")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{diagnose(cluster, namespace, real_path.operator)}") from None
        assert found["status"] == "False"
        assert "100Mi" in found["message"] and "spec.resources.limits.memory" in found["message"]
        assert cluster.get("phi3", "tiny-oom", namespace)["status"]["phase"] == "Failed"
    finally:
        cluster.kubectl("delete", "phi3", "tiny-oom", "-n", namespace, "--wait=false", check=False)


def delete_model_artifacts(tracking_uri: str, name: str, version: str) -> str:
    """Delete a registered version's files through the MLflow server; the registry entry stays."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    mlflow.set_tracking_uri(tracking_uri)
    download_uri = MlflowClient(tracking_uri).get_model_version_download_uri(name, version)
    get_artifact_repository(download_uri).delete_artifacts()
    return str(download_uri)


def test_deleted_model_artifacts_give_a_clear_condition_not_a_pod_stuck_in_init(real_path: RealPath) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    tracking_uri = real_path.mlflow.tracking_uri
    # A served version loses its files: the pod that replaces a serving one cannot fetch it.
    name = "tiny-gone"
    uri = real_path.package(name)
    cluster.apply(real_path.manifest(name, uri), namespace)
    try:
        try:
            wait_until(lambda: ready_model(cluster, name, namespace), timeout=300, interval=2, message="Ready")
            delete_model_artifacts(tracking_uri, name, uri.rsplit("/", 1)[1])
            cluster.kubectl("delete", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}",
                            "--wait=false")

            def fetch_reported() -> dict[str, Any] | None:
                found = condition(cluster, name, namespace, "Available")
                return found if found.get("reason") == "ModelFetchFailed" else None

            found = wait_until(fetch_reported, timeout=300, interval=2, message="Available=False ModelFetchFailed")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{diagnose(cluster, namespace, real_path.operator)}") from None
        assert found["status"] == "False"
        assert "could not fetch the model" in found["message"] and uri in found["message"], found["message"]
        resolved = condition(cluster, name, namespace, "ModelResolved")
        assert resolved["reason"] == "InvalidModel" and "artifacts were deleted" in resolved["message"], resolved
    finally:
        cluster.kubectl("delete", "phi3", name, "-n", namespace, "--wait=false", check=False)

    # A version whose files are gone before it is applied never gets a pod at all.
    name = "tiny-gone-early"
    uri = real_path.package(name)
    delete_model_artifacts(tracking_uri, name, uri.rsplit("/", 1)[1])
    cluster.apply(real_path.manifest(name, uri), namespace)
    try:
        def invalid() -> dict[str, Any] | None:
            found = condition(cluster, name, namespace, "ModelResolved")
            return found if found.get("reason") == "InvalidModel" else None

        found = wait_until(invalid, timeout=120, interval=1, message="ModelResolved=False InvalidModel")
        assert "artifacts were deleted" in found["message"] and uri in found["message"]
        assert cluster.get("phi3", name, namespace)["status"]["phase"] == "Failed"
        assert not cluster.exists("deployment", name, namespace)
    finally:
        cluster.kubectl("delete", "phi3", name, "-n", namespace, "--wait=false", check=False)


def test_a_restricted_namespace_admits_the_serving_pods(real_path: RealPath) -> None:
    cluster, namespace = real_path.cluster, real_path.restricted_namespace
    labels = cluster.get("namespace", namespace)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    uri = real_path.package("tiny-restricted")
    cluster.apply(real_path.manifest(MODEL, uri), namespace)
    try:
        wait_until(lambda: ready_model(cluster, MODEL, namespace), timeout=420, interval=2,
                   message="the model in a restricted namespace to be Ready")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(cluster, namespace, real_path.operator)}") from None
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    assert "violates PodSecurity" not in events
    cluster.kubectl("delete", "phi3", MODEL, "-n", namespace, "--wait=false", check=False)
