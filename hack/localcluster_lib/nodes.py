"""The kwok (fake) nodes, and kubectl against the cluster."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

from .build import binary
from .certs import kubeconfig_path
from .config import START_DEADLINE_S, die


def node(
    name: str, labels: dict[str, str], capacity: dict[str, str], taints: list[dict[str, str]]
) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                "type": "kwok", **labels,
            },
        },
        "spec": {"taints": taints},
        "status": {"allocatable": capacity, "capacity": capacity},
    }


NODES = [
    node("kwok-cpu-0", {"phi3.ai/hardware": "cpu"}, {"cpu": "32", "memory": "256Gi", "pods": "250"}, []),
    node(
        "kwok-gpu-0",
        {"phi3.ai/hardware": "cuda", "nvidia.com/gpu.present": "true"},
        {"cpu": "32", "memory": "256Gi", "pods": "250", "nvidia.com/gpu": "8"},
        [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
    ),
]


def kubectl(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [binary("kubectl"), f"--kubeconfig={kubeconfig_path()}", *args],
        input=stdin, text=True, capture_output=True,
    )
    if proc.returncode != 0:
        die(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def wait_for(what: str, check: Callable[[], bool], deadline_s: float = START_DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    die(f"timed out after {deadline_s:.0f}s waiting for {what}")


def nodes_ready() -> bool:
    out = kubectl("get", "nodes", "-o", "json")
    items = json.loads(out)["items"]
    ready = [
        n for n in items
        if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
    ]
    return sum(1 for n in ready if n["metadata"]["name"] in {fake["metadata"]["name"] for fake in NODES}) >= len(NODES)


def default_service_account() -> bool:
    proc = subprocess.run(
        [binary("kubectl"), f"--kubeconfig={kubeconfig_path()}", "get", "serviceaccount", "default", "-n", "default"],
        capture_output=True,
    )
    return proc.returncode == 0
