"""The autoscale timer's glue: gather → decide → apply → status, Events, metrics.

Per pipeline and round: read the stages' StatefulSets and ask Prometheus
(operator/observe.py's queries), build a Snapshot, run the policy (pure; its
state lives here in memory per pipeline uid, so a restart starts it afresh),
then:

- Active: persist the new sizes in `status.autoscaling.replicas` first (what
  reconcile renders, so a restart or drift repair keeps them), then apply
  the re-rendered StatefulSets. The operator is the only writer of replicas.
- Advisory: report only (status, metrics, Events); reconcile keeps the spec's sizes.
- Disabled: nothing, beyond removing what an earlier mode left in status.

Stale or missing metrics hold every stage at its current size (never zero by
accident) and set MetricsAvailable=False.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from disagfusion.operator import conditions as cond
from disagfusion.operator.autoscale.observe import build_snapshot, queries
from disagfusion.operator.autoscale.prometheus import Prometheus, PrometheusError
from disagfusion.operator.render import Owner, effective_replicas, render_all, stage_name
from disagfusion.operator.spec import STAGES, PipelineSpec, SpecError, parse_spec
from disagfusion.scheduling.planner import mean_service_times
from disagfusion.scheduling.profile import Profile
from disagfusion.scheduling.scaling import (
    Decision,
    Policy,
    Snapshot,
    accelerators_of,
    mix_or_default,
)

if TYPE_CHECKING:
    from disagfusion.operator.context import Context

log = logging.getLogger(__name__)
HISTORY_KEPT = 10


@dataclass
class Memory:
    """What the autoscaler keeps between rounds for one pipeline (in memory only)."""

    policy_state: Any
    last_round: float | None = None


def default_policy() -> Policy:
    from disagfusion.scheduling.hybrid import HybridPolicy

    return HybridPolicy()


def stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def autoscale(ctx: Context, body: Mapping[str, Any]) -> str:
    """One timer tick for one pipeline; returns what it did (for logs and tests)."""
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid") or "")
    try:
        spec = parse_spec(body.get("spec"))
    except SpecError:
        return "invalid"  # reconcile reports it
    with ctx.lock(uid):
        if spec.autoscaling.mode == "Disabled":
            return _disable(ctx, body, uid)
        policy = ctx.policy or default_policy()
        memory = ctx.scalers.get(uid)
        if memory is None:
            memory = ctx.scalers[uid] = Memory(policy.initial_state())
        now = ctx.clock()
        if memory.last_round is not None and now - memory.last_round < (
            spec.autoscaling.knobs.interval_s
        ):
            return "waiting"
        meta = body.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        statefulsets = {
            s: ctx.kube.get("apps/v1", "StatefulSet", namespace, stage_name(str(meta["name"]), s))
            for s in STAGES
        }
        if any(obj is None for obj in statefulsets.values()):
            return "waiting"  # reconcile creates the children first
        memory.last_round = now
        result = _round(ctx, body, uid, spec, policy, memory, now, statefulsets)
    ctx.metrics.scaling.rounds.labels(result=result).inc()
    return result


def _disable(ctx: Context, body: Mapping[str, Any], uid: str) -> str:
    meta = body.get("metadata") or {}
    name, namespace = str(meta["name"]), str(meta.get("namespace") or "default")
    ctx.scalers.pop(uid, None)
    ctx.metrics.scaling.forget(namespace, name)
    status = ctx.known_status(uid, body)
    conditions = status.get("conditions") or []
    kept = cond.without_scaling(conditions)
    if "autoscaling" in status or len(kept) != len(conditions):
        ctx.write_status(namespace, name, uid, status, {"autoscaling": None, "conditions": kept})
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
) -> str:
    meta = body.get("metadata") or {}
    name, namespace = str(meta["name"]), str(meta.get("namespace") or "default")
    auto = spec.autoscaling
    status = ctx.known_status(uid, body)
    active = auto.mode == "Active"
    saved = (status.get("autoscaling") or {}).get("replicas") if active else None
    current_sizes = effective_replicas(spec, saved)
    results, problem = _ask_prometheus(ctx, name, namespace, auto.prometheus_url)
    snapshot = build_snapshot(results, statefulsets, now, auto.accelerators, current_sizes)
    age = snapshot.metrics_age_s
    if results is not None and age is None:
        problem = f"Prometheus has no samples of pipeline {name} in {namespace}"
    elif age is not None and age > auto.knobs.stale_after_s:
        problem = f"newest sample is {age:.0f}s old"
    decision: Decision | None = None
    if auto.profile is not None:
        decision = policy.decide(snapshot, memory.policy_state, auto.profile, auto.knobs)
        memory.policy_state = decision.state
    metrics_ok = not problem and (decision is None or decision.metrics_ok)
    if not problem and not metrics_ok:
        problem = "the policy found the metrics incomplete"
    live = {s: snapshot.stages[s].desired for s in STAGES}
    if decision is not None and metrics_ok:
        targets = effective_replicas(spec, decision.replicas())
    else:
        # Stale or missing metrics: hold, never scale on a guess. Active holds its own
        # last sizes (an edited StatefulSet is put back), Advisory has no sizes of its own.
        targets = current_sizes if active else live
    changed = {s: (live[s], targets[s]) for s in STAGES if targets[s] != live[s]}

    when = stamp(now)
    generation = int(meta.get("generation") or 0)
    old_auto = status.get("autoscaling") or {}
    stages_status = _stages_status(snapshot, decision, targets)
    history = list(old_auto.get("history") or [])
    fresh = _history_entries(old_auto, changed, decision if metrics_ok else None, when, active)
    history = (history + fresh)[-HISTORY_KEPT:]
    limited = {s: d.limited for s, d in (decision.stages.items() if decision else ()) if d.limited}
    checks = cond.scaling_checks(
        auto.mode,
        auto.profile_name,
        metrics_ok,
        problem,
        limited if metrics_ok else {},
    )
    new_auto: dict[str, Any] = {
        "mode": auto.mode,
        "policy": policy.name,
        "profile": auto.profile_name or "",
        "stages": stages_status,
        "history": history,
        # Only Active owns the sizes; a None deletes them so reconcile uses the spec's.
        "replicas": targets if active else None,
    }
    if active and changed:
        new_auto["lastScaleTime"] = when
    patch: dict[str, Any] = {
        "autoscaling": new_auto,
        "conditions": cond.apply_scaling(status.get("conditions") or [], checks, when, generation),
    }
    ctx.write_status(namespace, name, uid, status, patch)  # skipped when nothing changed
    if active and changed:
        owner = Owner(name=name, namespace=namespace, uid=uid)
        for child in render_all(owner, spec, targets):
            if child.kind in ("StatefulSet", "ConfigMap"):
                ctx.kube.apply(child)
    _report(
        ctx, body, (namespace, name), fresh, snapshot, decision, targets, auto.profile, metrics_ok
    )
    if changed:
        log.info(
            "%s/%s: %s %s",
            namespace,
            name,
            "scaled" if active else "would scale",
            ", ".join(f"{s} {a}->{b}" for s, (a, b) in changed.items()),
        )
    if auto.profile is None:
        return "no_profile"
    return "ok" if metrics_ok else "no_metrics"


def _ask_prometheus(
    ctx: Context, name: str, namespace: str, url: str | None
) -> tuple[dict[str, dict[str, Any]] | None, str]:
    url = url or ctx.prometheus_url
    if not url:
        return None, "no Prometheus URL (spec.autoscaling.prometheusUrl or --prometheus-url)"
    try:
        client = Prometheus(url, ctx.prometheus_timeout_s)
        return client.query_all(queries(name, namespace, ctx.rate_window)), ""
    except PrometheusError as err:
        log.warning("%s/%s: Prometheus: %s", namespace, name, err)
        return None, f"Prometheus query failed: {err}"


def _stages_status(
    snapshot: Snapshot, decision: Decision | None, targets: Mapping[str, int]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in STAGES:
        obs = snapshot.stages[s]
        entry: dict[str, Any] = {"currentReplicas": obs.desired, "desiredReplicas": targets[s]}
        if decision is not None:
            d = decision.stages[s]
            entry |= {
                "predictedReplicas": d.predicted,
                "accelerator": d.accelerator,
                "reason": d.reason,
                "limited": d.limited,
            }
        else:
            entry["reason"] = "no profile: not sizing"
        out[s] = entry
    return out


def _history_entries(
    old_auto: Mapping[str, Any],
    changed: Mapping[str, tuple[int, int]],
    decision: Decision | None,
    when: str,
    active: bool,
) -> list[dict[str, Any]]:
    """One entry per stage whose desired size moved (Advisory: only when the advice changes)."""
    before = old_auto.get("stages") or {}
    out = []
    for s, (frm, to) in changed.items():
        if not active and (before.get(s) or {}).get("desiredReplicas") == to:
            continue  # the same advice as last round
        reason = decision.stages[s].reason if decision is not None else "held at the last size"
        out.append(
            {
                "time": when,
                "stage": s,
                "from": frm,
                "to": to,
                "applied": active,
                "reason": reason[:200],
            }
        )
    return out


def _report(
    ctx: Context,
    body: Mapping[str, Any],
    key: tuple[str, str],
    entries: list[dict[str, Any]],
    snapshot: Snapshot,
    decision: Decision | None,
    targets: Mapping[str, int],
    profile: Profile | None,
    metrics_ok: bool,
) -> None:
    """Decision metrics, and an Event per scale (or per new advice)."""
    namespace, name = key
    m = ctx.metrics.scaling
    m.metrics_available.labels(namespace, name).set(1 if metrics_ok else 0)
    if snapshot.arrival_rps is not None:
        m.arrival_rate.labels(namespace, name).set(snapshot.arrival_rps)
    for entry in entries:
        stage, frm, to = entry["stage"], entry["from"], entry["to"]
        limited = decision.stages[stage].limited if decision is not None else ""
        why = (limited or "load") if metrics_ok else "hold"
        m.decisions.labels(
            namespace,
            name,
            stage,
            "up" if to > frm else "down",
            why,
            "true" if entry["applied"] else "false",
        ).inc()
        verb = "Scaled" if entry["applied"] else "ScaleAdvised"
        ctx.kube.event(body, "Normal", verb, f"{stage} {frm} -> {to} replicas: {entry['reason']}")
    times = (
        mean_service_times(
            profile, accelerators_of(snapshot, profile), mix_or_default(snapshot, profile)
        )
        if profile is not None
        else {}
    )
    for s in STAGES:
        obs = snapshot.stages[s]
        m.current.labels(namespace, name, s).set(obs.desired)
        m.desired.labels(namespace, name, s).set(targets[s])
        if decision is not None:
            m.predicted.labels(namespace, name, s).set(decision.stages[s].predicted)
        if s in times:
            m.predicted_service_time.labels(namespace, name, s).set(times[s])
        if obs.service_time_s is not None:
            m.observed_service_time.labels(namespace, name, s).set(obs.service_time_s)
