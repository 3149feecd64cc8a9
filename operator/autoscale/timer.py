"""The autoscale timer's I/O: gather → decide → plan → write status, scale, report.

Per pipeline and round: read the stages' StatefulSets and ask Prometheus
(observe.py's queries), build a Snapshot, run the policy (pure; its state
lives here in memory per pipeline uid, so a restart starts it afresh), let
plan.py work out the round, then write what the plan says:

- Active: persist the new sizes in `status.autoscaling.replicas` first (what
  reconcile renders, so a restart or drift repair keeps them), then apply
  the re-rendered StatefulSets. The operator is the only writer of replicas.
- Advisory: report only (status, metrics, Events); reconcile keeps the spec's sizes.
- Disabled: nothing, beyond removing what an earlier mode left in status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from disagfusion.operator.autoscale.observe import build_snapshot, queries
from disagfusion.operator.autoscale.plan import (
    RoundPlan,
    disabled_patch,
    plan_round,
    rendered_sizes,
    round_due,
)
from disagfusion.operator.autoscale.prometheus import Prometheus, PrometheusError
from disagfusion.operator.children import render_all
from disagfusion.operator.context import Context
from disagfusion.operator.render import Owner, pool_name
from disagfusion.operator.spec import STAGES, PipelineSpec, SpecError, parse_spec
from disagfusion.scheduling.profile import with_stage_types
from disagfusion.scheduling.scaling import Decision, Policy

log = logging.getLogger(__name__)


@dataclass
class Memory:
    """What the autoscaler keeps between rounds for one pipeline (in memory only)."""

    policy_state: Any
    last_round: float | None = None


def default_policy(spec: PipelineSpec | None = None) -> Policy:
    """The hybrid policy; over heterogeneous pools (a stage with several) its pools
    variant, which sizes each pool (on one pool per stage the two are the same)."""
    if spec is not None and any(len(spec.stages[s].pools) > 1 for s in STAGES):
        from disagfusion.scheduling.hybrid_pools import HybridPoolsPolicy

        return HybridPoolsPolicy()
    from disagfusion.scheduling.hybrid import HybridPolicy

    return HybridPolicy()


def declared_types(spec: PipelineSpec) -> dict[str, list[str]]:
    """Per stage the accelerator types its pods can be on: a pooled stage's pools'
    (a policy must not plan a pool the cluster has no StatefulSet for), else its one."""
    auto = spec.autoscaling
    out = {}
    for s in STAGES:
        named = [p.accelerator for p in spec.stages[s].pools if p.accelerator]
        one = auto.accelerators.get(s) or ""
        out[s] = named or ([one] if one else [])
    return {s: names for s, names in out.items() if names}


def pool_maxima(spec: PipelineSpec) -> dict[str, dict[str, int]]:
    """Per pooled stage each pool's maxReplicas by accelerator, for the policy."""
    return {
        s: {p.accelerator: p.max_replicas for p in spec.stages[s].pools if p.accelerator}
        for s in STAGES
        if spec.stages[s].pools
    }


def autoscale(ctx: Context, body: Mapping[str, Any]) -> str:
    """One timer tick for one pipeline; returns what it did (for logs and tests)."""
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid") or "")
    try:
        # Parsed as reconcile parses it: the StatefulSets applied here must render the
        # same image (the operator's default for pipelines without spec.image).
        spec = parse_spec(body.get("spec"), ctx.spec_defaults)
    except SpecError:
        return "invalid"  # reconcile reports it
    with ctx.lock(uid):
        if spec.autoscaling.mode == "Disabled":
            return _disable(ctx, body, uid)
        policy = ctx.policy or default_policy(spec)
        memory = ctx.scalers.get(uid)
        if memory is None:
            memory = ctx.scalers[uid] = Memory(policy.initial_state())
        now = ctx.clock()
        if not round_due(memory.last_round, now, spec.autoscaling.knobs.interval_s):
            return "waiting"
        namespace = str(meta.get("namespace") or "default")
        found = _stage_workloads(ctx, spec, str(meta["name"]), namespace)
        if found is None:
            return "waiting"  # reconcile creates the children first
        memory.last_round = now
        result = _round(ctx, body, uid, spec, policy, memory, now, *found)
    ctx.metrics.scaling.rounds.labels(result=result).inc()
    return result


def _stage_workloads(
    ctx: Context, spec: PipelineSpec, name: str, namespace: str
) -> tuple[dict[str, Mapping[str, Any] | None], dict[str, dict[str, int]]] | None:
    """(per stage its StatefulSet, or for a stage with pools one with the pools' summed
    sizes; per pooled stage the replicas per accelerator), None while any is missing."""
    out: dict[str, Mapping[str, Any] | None] = {}
    pools: dict[str, dict[str, int]] = {}
    for s in STAGES:
        stage = spec.stages[s]
        found = [
            ctx.kube.get("apps/v1", "StatefulSet", namespace, pool_name(name, stage, pool))
            for pool in stage.effective_pools
        ]
        if any(obj is None for obj in found):
            return None
        if not stage.pools:
            out[s] = found[0]
            continue
        pools[s] = {}
        for pool, obj in zip(stage.pools, found, strict=True):
            n = int((obj or {})["spec"].get("replicas") or 0)
            pools[s][pool.accelerator or ""] = n
        out[s] = {
            "spec": {"replicas": sum(int((o or {})["spec"].get("replicas") or 0) for o in found)},
            "status": {
                "readyReplicas": sum(
                    int(((o or {}).get("status") or {}).get("readyReplicas") or 0) for o in found
                )
            },
        }
    return out, pools


def _disable(ctx: Context, body: Mapping[str, Any], uid: str) -> str:
    meta = body.get("metadata") or {}
    name, namespace = str(meta["name"]), str(meta.get("namespace") or "default")
    ctx.scalers.pop(uid, None)
    ctx.metrics.scaling.forget(namespace, name)
    status = ctx.known_status(uid, body)
    patch = disabled_patch(status)
    if patch is not None:
        ctx.write_status(namespace, name, uid, status, patch)
    return "disabled"


def _round(
    ctx: Context,
    body: Mapping[str, Any],
    uid: str,
    spec: PipelineSpec,
    policy: Policy,
    memory: Memory,
    now: float,
    statefulsets: Mapping[str, Mapping[str, Any] | None],
    pools: Mapping[str, Mapping[str, int]],
) -> str:
    meta = body.get("metadata") or {}
    name, namespace = str(meta["name"]), str(meta.get("namespace") or "default")
    auto = spec.autoscaling
    status = ctx.known_status(uid, body)
    results, asked_problem = _ask_prometheus(ctx, name, namespace, auto.prometheus_url)
    snapshot = build_snapshot(
        results, statefulsets, now, auto.accelerators, rendered_sizes(spec, status), pools
    )
    decision: Decision | None = None
    if auto.profile is not None:
        profile = with_stage_types(auto.profile, declared_types(spec))
        knobs = replace(auto.knobs, max_pool_replicas=pool_maxima(spec))
        decision = policy.decide(snapshot, memory.policy_state, profile, knobs)
        memory.policy_state = decision.state
    plan = plan_round(
        pipeline=name,
        namespace=namespace,
        generation=int(meta.get("generation") or 0),
        spec=spec,
        status=status,
        snapshot=snapshot,
        decision=decision,
        policy_name=policy.name,
        asked_problem=asked_problem,
        now=now,
    )
    ctx.write_status(namespace, name, uid, status, plan.status_patch)  # skipped if no change
    if plan.apply is not None:
        # Only the StatefulSets carry sizes; the topology ConfigMap lists maxReplicas.
        # A pooled stage's size is split over its pools (render.pool_replicas); a pool
        # whose share did not move renders unchanged and is not written.
        owner = Owner(name=name, namespace=namespace, uid=uid)
        for child in render_all(owner, spec, plan.apply, plan.apply_pools):
            if child.kind == "StatefulSet":
                ctx.kube.apply(child)
    _report(ctx, body, namespace, name, plan)
    if plan.changed:
        log.info(
            "%s/%s: %s %s",
            namespace,
            name,
            "scaled" if plan.apply is not None else "would scale",
            ", ".join(f"{s} {a}->{b}" for s, (a, b) in plan.changed.items()),
        )
    return plan.result


def _ask_prometheus(
    ctx: Context, name: str, namespace: str, url: str | None
) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """The answers to observe.queries(), or None and why there are none."""
    url = url or ctx.prometheus_url
    if not url:
        return None, "no Prometheus URL (spec.autoscaling.prometheusUrl or --prometheus-url)"
    try:
        client = Prometheus(url, ctx.prometheus_timeout_s)
        return client.query_all(queries(name, namespace, ctx.rate_window)), ""
    except PrometheusError as err:
        log.warning("%s/%s: Prometheus: %s", namespace, name, err)
        return None, f"Prometheus query failed: {err}"


def _report(
    ctx: Context, body: Mapping[str, Any], namespace: str, name: str, plan: RoundPlan
) -> None:
    """The plan's metric values and Events (one per scale, or per new advice)."""
    m = ctx.metrics.scaling
    m.metrics_available.labels(namespace, name).set(1 if plan.metrics_ok else 0)
    if plan.arrival_rps is not None:
        m.arrival_rate.labels(namespace, name).set(plan.arrival_rps)
    for d in plan.decisions:
        applied = "true" if d.applied else "false"
        m.decisions.labels(namespace, name, d.stage, d.direction, d.why, applied).inc()
    for event in plan.events:
        ctx.kube.event(body, event.type, event.reason, event.message)
    for s, g in plan.gauges.items():
        m.current.labels(namespace, name, s).set(g.current)
        m.desired.labels(namespace, name, s).set(g.desired)
        if g.predicted is not None:
            m.predicted.labels(namespace, name, s).set(g.predicted)
        if g.predicted_service_time_s is not None:
            m.predicted_service_time.labels(namespace, name, s).set(g.predicted_service_time_s)
        if g.observed_service_time_s is not None:
            m.observed_service_time.labels(namespace, name, s).set(g.observed_service_time_s)
