"""The local cluster's real node (kubelet + containerd) and the images that run on it.

`hack/localcluster up` starts the node `phi3-node-0` beside the kwok nodes; it is tainted so that only
pods that ask for it land there. `hack/images` builds the project's Dockerfiles with buildah and pushes
them to the registry on the node's bridge address.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phi3_operator.podhealth import start_phases
from tests.support.cluster import REPO_ROOT, Cluster, cached_binary
from tests.support.mlflow_server import MlflowServer
from tests.support.operator import OperatorProcess
from tests.support.serving import package
from tests.support.wait import wait_until

NODE_NAME = "phi3-node-0"
# Where the host serves the node's pods (API server, registry, DNS, test MLflow): the pod bridge's address.
BRIDGE_ADDRESS = "10.88.0.1"
NODE_SELECTOR = {"phi3.ai/node": "real"}
NODE_TOLERATION = {"key": "phi3.ai/node", "operator": "Equal", "value": "real", "effect": "NoSchedule"}
IMAGES = REPO_ROOT / "hack" / "images"


def build_images(*names: str) -> dict[str, str]:
    """Build (buildah layer cache makes a rebuild quick) and push; returns name -> registry/repo@digest."""
    proc = subprocess.run([str(IMAGES), "build", *names], text=True, capture_output=True, timeout=3600)
    if proc.returncode != 0:
        raise AssertionError(f"hack/images build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    refs: dict[str, str] = json.loads(subprocess.run([str(IMAGES), "refs"], text=True, capture_output=True,
                                                     check=True).stdout)
    return refs


def catalog_packages(image: str) -> list[str]:
    """What images/<image>/packages.txt says the image carries: a catalog entry's `packages`."""
    lines = (REPO_ROOT / "images" / image / "packages.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def on_real_node(manifest: dict[str, Any]) -> dict[str, Any]:
    """A Phi3Model (or pod spec holder) placed on the real node: its label and its taint's toleration."""
    placed = copy.deepcopy(manifest)
    hardware = placed["spec"].setdefault("hardware", {})
    hardware["nodeSelector"] = {**hardware.get("nodeSelector", {}), **NODE_SELECTOR}
    hardware["tolerations"] = [*hardware.get("tolerations", []), NODE_TOLERATION]
    return placed


def service_base_url(cluster: Cluster, name: str, namespace: str, timeout: float = 60) -> str:
    """The Service's ClusterIP: kube-proxy routes it from the host, as from any pod.

    Returned once it accepts a connection: a model is Ready as soon as its pod is, and kube-proxy
    programs the Service's new endpoint on its own next sync (a REJECT, so "connection refused",
    until then; seconds on this 2-core machine under load)."""
    service = cluster.get("service", name, namespace)
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    address = service["spec"]["clusterIP"]
    wait_until(lambda: _accepts(address, port), timeout=timeout, interval=0.5,
               message=f"kube-proxy to route Service {name} ({address}:{port})")
    return f"http://{address}:{port}"


def _accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except OSError:
        return False


def pod_start_phases(pod: dict[str, Any]) -> dict[str, float]:
    """Seconds from pod creation to scheduled, model fetched (init done), runtime started, Ready: the
    operator's own reading, which its rollout Event reports."""
    return start_phases(pod)


def serving_pods(cluster: Cluster, name: str, namespace: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = cluster.get("pods", namespace=namespace)["items"]
    return [p for p in pods if p["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == name]


def ctr_binary() -> str:
    return cached_binary("ctr")


def containerd_socket(cluster: Cluster) -> str:
    """The node's containerd (hack/localcluster keeps it in the cluster's state dir)."""
    return str(cluster.kubeconfig.parent / "node" / "containerd.sock")


@dataclass
class RealPath:
    cluster: Cluster
    mlflow: MlflowServer
    onnx_dir: Path
    images: dict[str, str]
    operator: OperatorProcess
    namespace: str
    restricted_namespace: str
    registered: list[str] = field(default_factory=list)

    def manifest(self, name: str, uri: str, **spec: Any) -> dict[str, Any]:
        return model_manifest(name, uri, self.mlflow.tracking_uri, image={"override": self.images["mlserver-cpu"]},
                              **spec)

    def package(self, name: str, alias: str = "champion", requirements: tuple[str, ...] = ()) -> str:
        uri = package("onnx", self.onnx_dir, name=name, tracking_uri=self.mlflow.tracking_uri, alias=alias,
                      requirements=requirements)
        self.registered.append(uri)
        return uri


def model_manifest(name: str, uri: str, tracking_uri: str, **spec: Any) -> dict[str, Any]:
    return on_real_node({
        "apiVersion": "phi3.ai/v1alpha1", "kind": "Phi3Model", "metadata": {"name": name},
        "spec": {
            "model": {"uri": uri, "trackingUri": tracking_uri},
            "hardware": {"target": "cpu"},
            # Two pods fit the 2-core node side by side during a rollout.
            "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "3Gi"}},
            "generation": {"maxTokens": 16},
            **spec,
        },
    })


def ready_model(cluster: Cluster, name: str, namespace: str) -> dict[str, Any] | None:
    obj: dict[str, Any] = cluster.get("phi3", name, namespace)
    status = obj.get("status", {})
    ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
    fresh = status.get("observedGeneration") == obj["metadata"]["generation"]
    return obj if fresh and ready.get("status") == "True" else None


def diagnose(cluster: Cluster, namespace: str, operator: OperatorProcess) -> str:
    pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
    events = cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False).stdout
    model = cluster.kubectl("get", "phi3", "-n", namespace, "-o", "yaml", check=False).stdout
    return f"pods:\n{pods}\nevents:\n{events[-4000:]}\nmodel:\n{model[-3000:]}\noperator:\n{operator.log()[-3000:]}"
