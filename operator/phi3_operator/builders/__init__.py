"""Pure manifest builders: (spec, decisions) -> manifest dicts. No I/O here."""

from __future__ import annotations

from phi3_operator.builders.common import BuildContext, Manifest, Owner
from phi3_operator.builders.deployment import build_deployment
from phi3_operator.builders.knative import build_configuration
from phi3_operator.builders.network import build_network_policy
from phi3_operator.builders.scaling import build_hpa, build_pdb
from phi3_operator.builders.service import build_service

__all__ = ["BuildContext", "Manifest", "Owner", "build_children", "build_deployment", "build_service"]


def build_children(ctx: BuildContext) -> list[Manifest]:
    """Every child the spec asks for, in apply order."""
    if ctx.elastic:
        children = [build_configuration(ctx)]
    else:
        children = [build_deployment(ctx), build_service(ctx)]
        if ctx.spec.autoscaling is not None:
            children.append(build_hpa(ctx))
    if ctx.spec.disruption_budget is not None:
        children.append(build_pdb(ctx))
    if ctx.spec.network is not None:
        children.append(build_network_policy(ctx))
    return children
