"""Model delivery on the real node: a version is published once as an OCI image and mounted as an image
volume, so a second replica, a restarted pod and a rollback start without downloading it again.

The proof is the registry's access log (every blob GET from containerd is a line in it) and the
MLflow server's (every artifact download is a line in it). A model whose artifacts are deleted gives a
clear condition, and what was published keeps serving, even through a pod restart.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from tests.support.cluster import Cluster
from tests.support.realnode import (
    BRIDGE_ADDRESS,
    NODE_NAME,
    RealPath,
    diagnose,
    pod_start_phases,
    ready_model,
    service_base_url,
    serving_pods,
)
from tests.support.wait import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

MODEL = "delivered"
# The session operator's config lists this registry as plain HTTP (tests/cluster/testdata/operator-config.yaml).
MODEL_REGISTRY = "10.88.0.1:5000/phi3-test"


def registry_log(cluster: Cluster) -> Path:
    return cluster.kubeconfig.parent / "logs" / "registry.log"


def blob_pulls(cluster: Cluster, repository: str) -> int:
    """Blob downloads by containerd from `repository`: what a node pulls when it has not got an image."""
    pattern = re.compile(rf'"GET /v2/{re.escape(repository)}/blobs/sha256:\w+ HTTP/[\d.]+" 200 .*containerd')
    return sum(1 for line in registry_log(cluster).read_text(errors="replace").splitlines() if pattern.search(line))


def artifact_downloads(real_path: RealPath) -> int:
    """Artifact downloads by pods that the MLflow server answered (its access log: a line per request,
    with the client's address). The host operator's own reads of MLmodel come from the bridge address."""
    log = real_path.mlflow.workdir / "mlflow-server.log"
    from_pod = re.compile(rf'(?<![\d.])(?!{re.escape(BRIDGE_ADDRESS)}:)10\.88\.0\.\d+:\d+ - "GET '
                          r'/api/2\.0/mlflow-artifacts/artifacts/')
    return sum(1 for line in log.read_text(errors="replace").splitlines() if from_pod.search(line))


def delivered_manifest(real_path: RealPath, name: str, uri: str, **spec: Any) -> dict[str, Any]:
    manifest = real_path.manifest(name, uri, **spec)
    manifest["spec"]["model"]["delivery"] = "ImageVolume"
    manifest["spec"]["image"]["registry"] = MODEL_REGISTRY
    return manifest


def wait_ready(real_path: RealPath, name: str, check: Any = None, timeout: float = 420) -> dict[str, Any]:
    cluster, namespace = real_path.cluster, real_path.namespace

    def ready() -> dict[str, Any] | None:
        obj = ready_model(cluster, name, namespace)
        if obj is None or (check is not None and not check(obj)):
            return None
        pods = serving_pods(cluster, name, namespace)
        want = obj["spec"].get("replicas", 1)
        fresh = [p for p in pods if not p["metadata"].get("deletionTimestamp")
                 and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]
        return obj if len(fresh) == want == len(pods) else None

    try:
        result: dict[str, Any] = wait_until(ready, timeout=timeout, interval=2, message=f"{name} to be Ready")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(cluster, namespace, real_path.operator)}") from None
    return result


def chat(cluster: Cluster, name: str, namespace: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{service_base_url(cluster, name, namespace)}/v1", api_key="unused", max_retries=0,
                    timeout=60)
    answer = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_a_version_reaches_the_node_once(real_path: RealPath) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    uri = real_path.package(MODEL)
    downloads_before = artifact_downloads(real_path)
    cluster.apply(delivered_manifest(real_path, MODEL, f"models:/{MODEL}@champion"), namespace)
    obj = wait_ready(real_path, MODEL)
    delivery = obj["status"]["delivery"]
    assert delivery["mode"] == "ImageVolume" and delivery["image"].startswith(f"{MODEL_REGISTRY}/phi3-models/")
    assert "@sha256:" in delivery["image"] and delivery["sizeBytes"] > 0
    assert obj["status"]["model"]["resolvedUri"] == uri
    delivered = next(c for c in obj["status"]["conditions"] if c["type"] == "ModelDelivered")
    assert delivered["reason"] == "Published", delivered
    [first] = serving_pods(cluster, MODEL, namespace)
    assert "initContainers" not in first["spec"] and first["spec"]["nodeName"] == NODE_NAME
    volume = next(v for v in first["spec"]["volumes"] if v["name"] == "models")
    assert volume["image"]["reference"] == delivery["image"]
    chat(cluster, MODEL, namespace)
    repository = delivery["image"].split("/", 1)[1].split("@")[0]
    pulls = blob_pulls(cluster, repository)
    downloads = artifact_downloads(real_path)
    assert pulls >= 1, "the first pod pulled the model image from the registry"
    assert downloads > downloads_before, "the publish Job downloaded the model from MLflow"
    cold = pod_start_phases(first)

    # A second replica on the same node, then a restarted pod: neither downloads anything.
    cluster.kubectl("patch", "phi3", MODEL, "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":2}}')
    wait_ready(real_path, MODEL, check=lambda o: o["status"].get("readyReplicas") == 2)
    cluster.kubectl("delete", "pod", "-n", namespace, first["metadata"]["name"], "--wait=false")
    wait_ready(real_path, MODEL, check=lambda o: first["metadata"]["name"] not in
               {p["metadata"]["name"] for p in serving_pods(cluster, MODEL, namespace)})
    pods = serving_pods(cluster, MODEL, namespace)
    assert len(pods) == 2 and {p["spec"]["nodeName"] for p in pods} == {NODE_NAME}
    assert blob_pulls(cluster, repository) == pulls, "a pod on a node that holds the image pulled it again"
    assert artifact_downloads(real_path) == downloads, "a pod downloaded the model from MLflow"
    warm = [pod_start_phases(p) for p in pods]
    print(f"image-volume pod start (s from creation): cold {json.dumps(cold)}, warm {json.dumps(warm)}")
    chat(cluster, MODEL, namespace)

    # Another model serving the same version: the publish Job is shared, nothing is published again.
    jobs = cluster.get("jobs", namespace=namespace)["items"]
    twin = f"{MODEL}-twin"
    cluster.apply(delivered_manifest(real_path, twin, uri), namespace)
    twin_obj = wait_ready(real_path, twin)
    assert twin_obj["status"]["delivery"]["image"] == delivery["image"]
    assert len(cluster.get("jobs", namespace=namespace)["items"]) == len(jobs)
    assert blob_pulls(cluster, repository) == pulls and artifact_downloads(real_path) == downloads
    cluster.kubectl("delete", "phi3", twin, "-n", namespace, "--wait=false")


def test_moving_the_alias_publishes_the_new_version_and_rolling_back_is_warm(real_path: RealPath) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    if not cluster.exists("phi3", MODEL, namespace):
        test_a_version_reaches_the_node_once(real_path)
    old = cluster.get("phi3", MODEL, namespace)["status"]
    old_uri, old_image = old["model"]["resolvedUri"], old["delivery"]["image"]
    new_uri = real_path.package(MODEL)  # the alias moves to a new version
    obj = wait_ready(real_path, MODEL, check=lambda o: o["status"]["model"]["resolvedUri"] == new_uri)
    new_image = obj["status"]["delivery"]["image"]
    assert new_image != old_image and new_image.split("@")[0] == old_image.split("@")[0]
    pulls = blob_pulls(cluster, old_image.split("/", 1)[1].split("@")[0])
    version = old_uri.rsplit("/", 1)[1]
    cluster.kubectl("patch", "phi3", MODEL, "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"model": {"uri": f"models:/{MODEL}/{version}"}}}))
    back = wait_ready(real_path, MODEL, check=lambda o: o["status"]["model"]["resolvedUri"] == old_uri)
    assert back["status"]["delivery"]["image"] == old_image
    assert blob_pulls(cluster, old_image.split("/", 1)[1].split("@")[0]) == pulls, "a rollback pulled again"
    chat(cluster, MODEL, namespace)


def test_deleted_artifacts_are_a_clear_condition_and_the_published_image_keeps_serving(real_path: RealPath) -> None:
    cluster, namespace = real_path.cluster, real_path.namespace
    name = "vanishing"
    uri = real_path.package(name)
    cluster.apply(delivered_manifest(real_path, name, uri), namespace)
    wait_ready(real_path, name)
    from mlflow import MlflowClient

    version = MlflowClient(tracking_uri=real_path.mlflow.tracking_uri).get_model_version(name, uri.rsplit("/", 1)[1])
    logged_model = (version.source or "").rsplit("/", 1)[-1]
    artifacts = real_path.mlflow.workdir / "artifacts"
    # Delete the version's files from the artifact store, as a retention job would.
    removed = [path.parent for path in artifacts.rglob("MLmodel") if logged_model and logged_model in str(path)]
    assert removed, f"no artifacts of {uri} ({version.source}) under {artifacts}"
    for folder in removed:
        shutil.rmtree(folder)

    def reported() -> dict[str, Any] | None:
        status = cluster.get("phi3", name, namespace).get("status", {})
        resolved = next((c for c in status.get("conditions", []) if c["type"] == "ModelResolved"), {})
        return resolved if resolved.get("status") == "False" else None

    try:
        resolved = wait_until(reported, timeout=120, interval=2, message="ModelResolved=False for deleted artifacts")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{diagnose(cluster, namespace, real_path.operator)}") from None
    assert resolved["reason"] == "InvalidModel" and "still serving" in resolved["message"], resolved
    # The pods never read MLflow: a restarted one mounts the published image again and serves.
    [pod] = serving_pods(cluster, name, namespace)
    cluster.kubectl("delete", "pod", "-n", namespace, pod["metadata"]["name"], "--wait=false")

    def replaced() -> bool:
        pods = serving_pods(cluster, name, namespace)
        return len(pods) == 1 and pods[0]["metadata"]["name"] != pod["metadata"]["name"] and any(
            c["type"] == "Ready" and c["status"] == "True" for c in pods[0]["status"].get("conditions", []))

    wait_until(replaced, timeout=300, interval=2, message="the restarted pod to serve without MLflow's files")
    chat(cluster, name, namespace)
    cluster.kubectl("delete", "phi3", name, "-n", namespace, "--wait=false")
