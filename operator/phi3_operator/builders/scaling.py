"""Optional children: the HorizontalPodAutoscaler and the PodDisruptionBudget."""

from __future__ import annotations

from typing import Any

from phi3_operator.builders.common import BuildContext, Manifest, metadata, selector_labels


def build_hpa(ctx: BuildContext) -> Manifest:
    autoscaling = ctx.spec.autoscaling
    assert autoscaling is not None, "build_hpa needs spec.autoscaling"
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(ctx.owner),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ctx.owner.name},
            # minReplicas 0 without Knative: an HPA cannot go below one (the status says why).
            "minReplicas": max(1, autoscaling.min_replicas),
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": autoscaling.target_cpu_utilization},
                    },
                }
            ],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": autoscaling.scale_down_delay_s}},
        },
    }


def build_pdb(ctx: BuildContext) -> Manifest:
    budget = ctx.spec.disruption_budget
    assert budget is not None, "build_pdb needs spec.disruptionBudget"
    spec: dict[str, Any] = {"selector": {"matchLabels": selector_labels(ctx.owner)}}
    if budget.max_unavailable is not None:
        spec["maxUnavailable"] = budget.max_unavailable
    else:
        spec["minAvailable"] = budget.min_available if budget.min_available is not None else 1
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": metadata(ctx.owner), "spec": spec}
