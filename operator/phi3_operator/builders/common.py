"""What every child shares: names, labels, owner references."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from phi3_operator.spec import Phi3ModelSpec

Manifest = dict[str, Any]

API_VERSION = "phi3.ai/v1alpha1"
KIND = "Phi3Model"
MANAGED_BY = "phi3-operator"
MODEL_LABEL = "phi3.ai/model"
MODEL_DIR = "/models/model"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8080, 8081, 8082


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class BuildContext:
    """Everything a builder needs, decided before building: builders make no choices that need I/O."""

    owner: Owner
    spec: Phi3ModelSpec
    image: str
    model_uri: str  # resolved and immutable where the resolver could make it so
    tracking_uri: str
    onnx_variant: str
    # ImageVolume delivery: the model's published image, pinned by digest; "" downloads it per pod.
    model_image: str = ""
    model_size_bytes: int = 0  # 0: unknown
    # NetworkPolicy peers (`from` entries) that may scrape the metrics port: the operator's config.monitoring.
    monitoring_peers: tuple[Mapping[str, Any], ...] = ()
    # The cluster serves Knative Serving's API: autoscaling on requests (and to zero) goes through it.
    knative: bool = False

    @property
    def elastic(self) -> bool:
        """Served as a Knative Configuration: autoscaling on requests in flight where Knative is installed."""
        autoscaling = self.spec.autoscaling
        return self.knative and autoscaling is not None and autoscaling.on_requests


def selector_labels(owner: Owner) -> dict[str, str]:
    return {"app.kubernetes.io/name": "phi3-model", "app.kubernetes.io/instance": owner.name}


def labels(owner: Owner) -> dict[str, str]:
    return {**selector_labels(owner), "app.kubernetes.io/managed-by": MANAGED_BY, MODEL_LABEL: owner.name}


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(owner: Owner, name: str | None = None) -> dict[str, Any]:
    return {
        "name": name or owner.name,
        "namespace": owner.namespace,
        "labels": labels(owner),
        "ownerReferences": [owner_reference(owner)],
    }
