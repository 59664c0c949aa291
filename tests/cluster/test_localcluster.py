"""The local control plane behaves like a real cluster: rollouts, scheduling, GC, CRDs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.support.cluster import Cluster
from tests.support.wait import wait_until

pytestmark = pytest.mark.cluster

TESTDATA = Path(__file__).parent / "testdata"


def web_deployment(replicas: int) -> list[dict[str, Any]]:
    labels = {"app": "web"}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "web", "image": "nginx:stable",
                                             "ports": [{"containerPort": 80}]}]},
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": 80}]},
        },
    ]


def ready_endpoints(cluster: Cluster, namespace: str, service: str) -> int:
    slices = cluster.get("endpointslices", namespace=namespace)["items"]
    return sum(
        1
        for s in slices
        if s["metadata"].get("labels", {}).get("kubernetes.io/service-name") == service
        for e in s.get("endpoints") or []
        if e.get("conditions", {}).get("ready")
    )


def test_deployment_rolls_out_and_endpoints_fill(cluster: Cluster, namespace: str) -> None:
    cluster.apply(web_deployment(replicas=2), namespace=namespace)
    wait_until(
        lambda: cluster.get("deployment", "web", namespace)["status"].get("availableReplicas") == 2,
        timeout=60,
        message="deployment web to have 2 available replicas",
    )
    wait_until(lambda: ready_endpoints(cluster, namespace, "web") == 2, timeout=60,
               message="two ready endpoints for service web")


def gpu_pod(name: str, tolerate: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [{"name": "cuda", "image": "runtime:cuda",
                        "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
    }
    if tolerate:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_gpu_pod_needs_the_toleration(cluster: Cluster, namespace: str) -> None:
    cluster.apply([gpu_pod("tolerant", tolerate=True), gpu_pod("intolerant", tolerate=False)], namespace)

    def running_on_gpu_node() -> bool:
        pod = cluster.get("pod", "tolerant", namespace)
        return pod["spec"].get("nodeName") == "kwok-gpu-0" and pod["status"].get("phase") == "Running"

    wait_until(running_on_gpu_node, timeout=60, message="the tolerant GPU pod to run on kwok-gpu-0")

    def failed_scheduling_event() -> list[dict[str, Any]]:
        events = cluster.get("events", namespace=namespace)["items"]
        return [e for e in events
                if e["involvedObject"]["name"] == "intolerant" and e["reason"] == "FailedScheduling"]

    events = wait_until(failed_scheduling_event, timeout=60, message="a FailedScheduling event")
    assert "untolerated taint" in events[0]["message"] or "nvidia.com/gpu" in events[0]["message"]
    pod = cluster.get("pod", "intolerant", namespace)
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_garbage_collector_removes_owned_children(cluster: Cluster, namespace: str) -> None:
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}, namespace)
    owner_uid = cluster.get("configmap", "owner", namespace)["metadata"]["uid"]
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "child",
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}],
            },
        },
        namespace,
    )
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_until(lambda: not cluster.exists("configmap", "child", namespace), timeout=60,
               message="the garbage collector to delete the child ConfigMap")


def test_crd_is_served_and_its_schema_enforced(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(TESTDATA / "widgets-crd.yaml"))
    wait_until(
        lambda: any(c["type"] == "Established" and c["status"] == "True"
                    for c in cluster.get("crd", "widgets.testing.phi3.ai")["status"].get("conditions", [])),
        timeout=30,
        message="the Widget CRD to be established",
    )

    def widget(size: int) -> str:
        return json.dumps({"apiVersion": "testing.phi3.ai/v1", "kind": "Widget",
                           "metadata": {"name": f"w{size}"}, "spec": {"size": size}})

    wait_until(lambda: cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=widget(3), check=False)
               .returncode == 0, timeout=30, message="a valid Widget to be accepted")
    assert cluster.get("widget", "w3", namespace)["spec"]["size"] == 3

    rejected = cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=widget(42), check=False)
    assert rejected.returncode != 0
    assert "spec.size" in rejected.stderr
    assert "should be less than or equal to 10" in rejected.stderr
