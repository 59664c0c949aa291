"""The Service in front of the runtime pods."""

from __future__ import annotations

from phi3_operator.builders.common import GRPC_PORT, METRICS_PORT, BuildContext, Manifest, metadata, selector_labels


def build_service(ctx: BuildContext) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx.owner),
        "spec": {
            "type": ctx.spec.service.type,
            "selector": selector_labels(ctx.owner),
            "ports": [
                {"name": "http", "port": ctx.spec.service.port, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }
