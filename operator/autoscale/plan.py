"""One autoscaler round's plan (pure): what to write, apply and report.

Given the spec, the pipeline's last status, the round's Snapshot, the
policy's Decision (None without a profile) and `now`, `plan_round` works out
the status patch, the new history entries, the sizes to apply (Active only),
the Events to post and the metric values to set. timer.py does the I/O
around it: it reads the StatefulSets, asks Prometheus, runs the policy, then
writes what the plan says.

Stale or missing metrics hold every stage at its current size (never zero by
accident) and set MetricsAvailable=False.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from disagfusion.operator import conditions as cond
from disagfusion.operator.render import effective_replicas
from disagfusion.operator.spec import STAGES, PipelineSpec
from disagfusion.scheduling.planner import mean_service_times
from disagfusion.scheduling.profile import Profile
from disagfusion.scheduling.scaling import Decision, Snapshot, accelerators_of, mix_or_default

HISTORY_KEPT = 10


@dataclass(frozen=True)
class Event:
    """A core/v1 Event to post about the pipeline."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class DecisionLabels:
    """The labels of one disagfusion_operator_scaling_decisions_total increment."""

    stage: str
    direction: str  # "up" or "down"
    why: str  # "load", "max", "budget" or "hold"
    applied: bool


@dataclass(frozen=True)
class StageGauges:
    """One stage's gauge values; None leaves a gauge as it is."""

    current: int
    desired: int
    predicted: int | None
    predicted_service_time_s: float | None
    observed_service_time_s: float | None


@dataclass(frozen=True)
class RoundPlan:
    status_patch: dict[str, Any]  # a merge patch of the pipeline's status
    apply: dict[str, int] | None  # Active and a size moved: every stage's size to apply
    # With `apply`: the pooled stages' sizes per pool (pool name -> replicas) when the
    # policy sized their pools; a stage missing here is split in pool order.
    apply_pools: dict[str, dict[str, int]] | None
    changed: dict[str, tuple[int, int]]  # stage -> (live size, target)
    history: list[dict[str, Any]]  # the entries this round adds to status history
    events: list[Event]
    decisions: list[DecisionLabels]
    gauges: dict[str, StageGauges]
    arrival_rps: float | None
    metrics_ok: bool
    result: str  # "ok", "no_metrics" or "no_profile"


def stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def autoscaled_replicas(spec: PipelineSpec, status: Mapping[str, Any]) -> dict[str, int] | None:
    """The sizes the autoscaler set, when it is Active (else the spec's sizes apply)."""
    if spec.autoscaling.mode != "Active":
        return None
    saved = (status.get("autoscaling") or {}).get("replicas") or {}
    return {s: int(v) for s, v in saved.items() if s in STAGES and isinstance(v, int)} or None


def autoscaled_pools(
    spec: PipelineSpec, status: Mapping[str, Any]
) -> dict[str, dict[str, int]] | None:
    """The per-pool sizes the autoscaler set for pooled stages, when it is Active."""
    if spec.autoscaling.mode != "Active":
        return None
    saved = (status.get("autoscaling") or {}).get("pools") or {}
    out = {}
    for stage, sizes in saved.items():
        if stage not in STAGES or not isinstance(sizes, Mapping):
            continue
        names = {p.name for p in spec.stages[stage].pools}
        kept = {p: int(n) for p, n in sizes.items() if p in names and isinstance(n, int)}
        if kept and set(kept) == names:  # a pool added or renamed since: split afresh
            out[stage] = kept
    return out or None


def pool_targets(spec: PipelineSpec, decision: Decision | None) -> dict[str, dict[str, int]]:
    """Per pooled stage the decision's sizes by pool name (its pools name accelerators,
    one pool per accelerator), each within the pool's min and max; {} for stages the
    decision sized as a whole."""
    out: dict[str, dict[str, int]] = {}
    if decision is None:
        return out
    for stage in STAGES:
        pools = spec.stages[stage].pools
        d = decision.stages.get(stage)
        if not pools or d is None or not d.pools:
            continue
        wanted = d.pool_sizes()
        out[stage] = {
            p.name: max(p.min_replicas, min(p.max_replicas, wanted.get(p.accelerator or "", 0)))
            for p in pools
        }
    return out


def rendered_sizes(spec: PipelineSpec, status: Mapping[str, Any]) -> dict[str, int]:
    """Each stage's size as reconcile renders it: the autoscaler's (Active), else the spec's."""
    return effective_replicas(spec, autoscaled_replicas(spec, status))


def round_due(last_round: float | None, now: float, interval_s: float) -> bool:
    return last_round is None or now - last_round >= interval_s


def disabled_patch(status: Mapping[str, Any]) -> dict[str, Any] | None:
    """Mode Disabled: remove what an earlier mode left in status; None when nothing is left."""
    conditions = status.get("conditions") or []
    kept = cond.without_scaling(conditions)
    if "autoscaling" in status or len(kept) != len(conditions):
        return {"autoscaling": None, "conditions": kept}
    return None


def metrics_problem(
    pipeline: str, namespace: str, snapshot: Snapshot, stale_after_s: float, asked_problem: str
) -> str:
    """Why the round's metrics cannot be trusted; "" when they are fresh.

    `asked_problem` is why Prometheus gave no answer ("" when it answered).
    """
    if asked_problem:
        return asked_problem
    age = snapshot.metrics_age_s
    if age is None:
        return f"Prometheus has no samples of pipeline {pipeline} in {namespace}"
    if age > stale_after_s:
        return f"newest sample is {age:.0f}s old"
    return ""


def plan_round(
    *,
    pipeline: str,
    namespace: str,
    generation: int,
    spec: PipelineSpec,
    status: Mapping[str, Any],
    snapshot: Snapshot,
    decision: Decision | None,
    policy_name: str,
    asked_problem: str,
    now: float,
) -> RoundPlan:
    """The round's writes and reports; `asked_problem` as in metrics_problem."""
    auto = spec.autoscaling
    active = auto.mode == "Active"
    problem = metrics_problem(
        pipeline, namespace, snapshot, auto.knobs.stale_after_s, asked_problem
    )
    metrics_ok = not problem and (decision is None or decision.metrics_ok)
    if not problem and not metrics_ok:
        problem = "the policy found the metrics incomplete"
    live = {s: snapshot.stages[s].desired for s in STAGES}
    pools: dict[str, dict[str, int]] = {}
    if decision is not None and metrics_ok:
        targets = effective_replicas(spec, decision.replicas())
        pools = pool_targets(spec, decision)
        targets |= {s: sum(sizes.values()) for s, sizes in pools.items()}
    else:
        # Stale or missing metrics: hold, never scale on a guess. Active holds its own
        # last sizes (an edited StatefulSet is put back), Advisory has no sizes of its own.
        targets = rendered_sizes(spec, status) if active else live
    changed = {s: (live[s], targets[s]) for s in STAGES if targets[s] != live[s]}
    moved_pools = {s for s, sizes in pools.items() if _live_pools(spec, snapshot, s) != sizes}

    when = stamp(now)
    old_auto = status.get("autoscaling") or {}
    trusted = decision if metrics_ok else None
    fresh = _history_entries(old_auto, changed, trusted, when, active)
    limited = {s: d.limited for s, d in (trusted.stages.items() if trusted else ()) if d.limited}
    checks = cond.scaling_checks(auto.mode, auto.profile_name, metrics_ok, problem, limited)
    new_auto: dict[str, Any] = {
        "mode": auto.mode,
        "policy": policy_name,
        "profile": auto.profile_name or "",
        "stages": _stages_status(snapshot, decision, targets, pools),
        "history": (list(old_auto.get("history") or []) + fresh)[-HISTORY_KEPT:],
        # Only Active owns the sizes; a None deletes them so reconcile uses the spec's.
        "replicas": targets if active else None,
        "pools": (pools or None) if active else None,
    }
    if active and (changed or moved_pools):
        new_auto["lastScaleTime"] = when
    conditions = cond.apply_scaling(status.get("conditions") or [], checks, when, generation)
    result = "no_profile" if auto.profile is None else ("ok" if metrics_ok else "no_metrics")
    return RoundPlan(
        status_patch={"autoscaling": new_auto, "conditions": conditions},
        apply=targets if active and (changed or moved_pools) else None,
        apply_pools=(pools or None) if active and (changed or moved_pools) else None,
        changed=changed,
        history=fresh,
        events=[_event(entry) for entry in fresh],
        decisions=[_decision_labels(entry, decision, metrics_ok) for entry in fresh],
        gauges=_gauges(snapshot, decision, targets, auto.profile),
        arrival_rps=snapshot.arrival_rps,
        metrics_ok=metrics_ok,
        result=result,
    )


def _live_pools(spec: PipelineSpec, snapshot: Snapshot, stage: str) -> dict[str, int]:
    """A pooled stage's sizes now by pool name (the snapshot has them by accelerator)."""
    by_acc = snapshot.stages[stage].pools
    return {p.name: by_acc.get(p.accelerator or "", 0) for p in spec.stages[stage].pools}


def _stages_status(
    snapshot: Snapshot,
    decision: Decision | None,
    targets: Mapping[str, int],
    pools: Mapping[str, Mapping[str, int]],
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in STAGES:
        obs = snapshot.stages[s]
        entry: dict[str, Any] = {"currentReplicas": obs.desired, "desiredReplicas": targets[s]}
        if s in pools:
            entry["desiredPools"] = dict(pools[s])
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


def _event(entry: Mapping[str, Any]) -> Event:
    """A scale (Active) or a new advice (Advisory), one per history entry."""
    verb = "Scaled" if entry["applied"] else "ScaleAdvised"
    message = f"{entry['stage']} {entry['from']} -> {entry['to']} replicas: {entry['reason']}"
    return Event("Normal", verb, message)


def _decision_labels(
    entry: Mapping[str, Any], decision: Decision | None, metrics_ok: bool
) -> DecisionLabels:
    stage = entry["stage"]
    limited = decision.stages[stage].limited if decision is not None else ""
    why = (limited or "load") if metrics_ok else "hold"
    direction = "up" if entry["to"] > entry["from"] else "down"
    return DecisionLabels(stage, direction, why, bool(entry["applied"]))


def _gauges(
    snapshot: Snapshot,
    decision: Decision | None,
    targets: Mapping[str, int],
    profile: Profile | None,
) -> dict[str, StageGauges]:
    times = (
        mean_service_times(
            profile, accelerators_of(snapshot, profile), mix_or_default(snapshot, profile)
        )
        if profile is not None
        else {}
    )
    return {
        s: StageGauges(
            current=snapshot.stages[s].desired,
            desired=targets[s],
            predicted=decision.stages[s].predicted if decision is not None else None,
            predicted_service_time_s=times.get(s),
            observed_service_time_s=snapshot.stages[s].service_time_s,
        )
        for s in STAGES
    }
