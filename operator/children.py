"""Every child of a pipeline, in apply order: render.py's objects and netpol.py's policies."""

from __future__ import annotations

from collections.abc import Mapping

from disagfusion.operator.netpol import render_network_policies
from disagfusion.operator.render import (
    Child,
    Owner,
    effective_replicas,
    render_gateway,
    render_stage,
    render_topology,
)
from disagfusion.operator.spec import STAGES, PipelineSpec


def render_all(
    owner: Owner,
    spec: PipelineSpec,
    replicas: Mapping[str, int] | None = None,
    pools: Mapping[str, Mapping[str, int]] | None = None,
) -> list[Child]:
    """Every child of a pipeline, in apply order (network policies, topology, stages,
    gateway: a pod never starts unprotected when the policies are on).

    `replicas` (stage -> size) overrides spec.stages[].replicas: the autoscaler's
    sizes in Active mode, clamped to each stage's [minReplicas, maxReplicas];
    `pools` (stage -> pool name -> size) the per-pool sizes it set for pooled stages.
    """
    sizes = effective_replicas(spec, replicas)
    children = [*render_network_policies(owner, spec), render_topology(owner, spec)]
    for stage in STAGES:
        stage_pools = (pools or {}).get(stage)
        children += render_stage(owner, spec, spec.stages[stage], sizes[stage], stage_pools)
    return children + render_gateway(owner, spec)
