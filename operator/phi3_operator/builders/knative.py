"""Elastic serving through Knative Serving: a Configuration whose Revisions scale on requests in flight,
to and from zero, with the activator holding requests while no pod is Ready.

The pod is the Deployment builder's, less what a Revision may not carry (Knative's webhook refuses
them): more than one port, named probe ports, lifecycle hooks, a grace period (Knative derives it from
the request timeout) and image volumes. No Route: none is needed to reach a Revision, and no Knative
ingress can be had here; clients call the Revision's own Service, through the activator.
"""

from __future__ import annotations

import copy
from typing import Any

from phi3_operator.builders.common import HTTP_PORT, BuildContext, Manifest, metadata
from phi3_operator.builders.deployment import build_deployment

KNATIVE_API_VERSION = "serving.knative.dev/v1"
# Knative's autoscaler class and the annotations it reads on a Revision template.
KPA_CLASS = "kpa.autoscaling.knative.dev"
# Requests, streams included, are proxied both ways at once (HTTP/1 full duplex); without it the queue
# proxy cut about one stream in 500 after its first chunk ("use of closed network connection").
FULL_DUPLEX_ANNOTATION = "features.knative.dev/http-full-duplex"
# The activator stays in the request path at every scale (-1), so a scale-down never races a request
# routed straight at a pod that is going, and the held requests are spread as pods come up.
TARGET_BURST_CAPACITY = "-1"
# A Revision's request timeout (Knative's cap): a held request's wait and its whole answer fit within it.
REQUEST_TIMEOUT_S = 600
# The queue proxy probes the runtime for the kubelet; each second, so a held request goes as soon as it can.
READY_PROBE_PERIOD_S = 1


def revision_annotations(ctx: BuildContext) -> dict[str, str]:
    autoscaling = ctx.spec.autoscaling
    assert autoscaling is not None, "a Configuration needs spec.autoscaling"
    return {
        "autoscaling.knative.dev/class": KPA_CLASS,
        "autoscaling.knative.dev/metric": "concurrency",
        "autoscaling.knative.dev/target": str(autoscaling.target_requests_per_replica),
        "autoscaling.knative.dev/min-scale": str(autoscaling.min_replicas),
        "autoscaling.knative.dev/max-scale": str(autoscaling.max_replicas),
        "autoscaling.knative.dev/scale-down-delay": f"{autoscaling.scale_down_delay_s}s",
        "autoscaling.knative.dev/target-burst-capacity": TARGET_BURST_CAPACITY,
        FULL_DUPLEX_ANNOTATION: "Enabled",
    }


def _revision_container(container: dict[str, Any]) -> dict[str, Any]:
    container = copy.deepcopy(container)
    container["ports"] = [{"name": "http1", "containerPort": HTTP_PORT, "protocol": "TCP"}]
    for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = container.get(probe_name)
        if probe and "httpGet" in probe:
            probe["httpGet"].pop("port", None)  # Knative: the serving port, which it probes through
    if "readinessProbe" in container:
        container["readinessProbe"]["periodSeconds"] = READY_PROBE_PERIOD_S
    container.pop("startupProbe", None)  # the Revision's progress deadline bounds a load instead
    container.pop("lifecycle", None)  # the queue proxy drains; a preStop hook is not allowed
    return container


def build_configuration(ctx: BuildContext) -> Manifest:
    autoscaling = ctx.spec.autoscaling
    assert autoscaling is not None, "a Configuration needs spec.autoscaling"
    template = copy.deepcopy(build_deployment(ctx)["spec"]["template"])
    pod = template["spec"]
    pod.pop("terminationGracePeriodSeconds", None)
    pod["containers"] = [_revision_container(c) for c in pod["containers"]]
    pod["timeoutSeconds"] = REQUEST_TIMEOUT_S
    # Past it, the activator answers a held request 504 ("activator request timeout"): the wait for a pod
    # to be Ready and for the answer to begin are what it bounds; REQUEST_TIMEOUT_S bounds the whole stream.
    pod["responseStartTimeoutSeconds"] = autoscaling.activation_timeout_s
    template["metadata"]["annotations"] = {**template["metadata"].get("annotations", {}),
                                           **revision_annotations(ctx)}
    return {
        "apiVersion": KNATIVE_API_VERSION,
        "kind": "Configuration",
        "metadata": metadata(ctx.owner),
        "spec": {"template": template},
    }


def revision_url(revision: str, namespace: str) -> str:
    """A Revision's own Service, through the activator at any scale: it holds what arrives at zero."""
    return f"http://{revision}.{namespace}.svc"
