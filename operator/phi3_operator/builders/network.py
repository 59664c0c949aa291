"""The NetworkPolicy that spec.network asks for: who may reach the serving port, and who may scrape metrics."""

from __future__ import annotations

from typing import Any

from phi3_operator.builders.common import (
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    BuildContext,
    Manifest,
    metadata,
    selector_labels,
)
from phi3_operator.spec import NetworkPeer


def network_peer(peer: NetworkPeer) -> dict[str, Any]:
    """A NetworkPolicy `from` entry: both selectors in one entry mean pods matching both (Kubernetes' AND)."""
    entry: dict[str, Any] = {}
    if peer.namespace_selector is not None:
        entry["namespaceSelector"] = dict(peer.namespace_selector)
    if peer.pod_selector is not None:
        entry["podSelector"] = dict(peer.pod_selector)
    return entry


def build_network_policy(ctx: BuildContext) -> Manifest:
    network = ctx.spec.network
    assert network is not None, "build_network_policy needs spec.network"
    serving_ports = [{"protocol": "TCP", "port": port} for port in (HTTP_PORT, GRPC_PORT)]
    ingress: list[dict[str, Any]] = []
    # An empty `from` would admit everyone: with no peers the serving ports get no rule, so nobody.
    if network.allow_from:
        ingress.append({"from": [network_peer(peer) for peer in network.allow_from], "ports": serving_ports})
    if ctx.monitoring_peers:
        ingress.append({"from": [dict(peer) for peer in ctx.monitoring_peers],
                        "ports": [{"protocol": "TCP", "port": METRICS_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(ctx.owner),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(ctx.owner)},
            # Ingress only: the model's own egress (MLflow, the registry, DNS) is the cluster's to govern.
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
