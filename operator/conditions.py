"""Status conditions and readiness evaluation (pure; `now` is passed in).

cert-manager style: gather the children's observed state, evaluate a chain of
checks, set conditions keeping `lastTransitionTime` when a condition's status
does not change, stamp `observedGeneration`, and write only when it changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
INVALID_SPEC = "InvalidSpec"


@dataclass(frozen=True)
class WorkloadState:
    """What the API server reports about one StatefulSet or Deployment."""

    name: str
    exists: bool
    desired: int = 0
    replicas: int = 0
    ready: int = 0
    updated: int = 0
    generation: int = 0
    observed_generation: int = 0

    @classmethod
    def from_object(cls, name: str, obj: Mapping[str, Any] | None, desired: int) -> WorkloadState:
        if obj is None:
            return cls(name=name, exists=False, desired=desired)
        status = obj.get("status") or {}
        meta = obj.get("metadata") or {}
        return cls(
            name=name,
            exists=True,
            desired=desired,
            replicas=int(status.get("replicas") or 0),
            ready=int(status.get("readyReplicas") or 0),
            updated=int(status.get("updatedReplicas") or 0),
            generation=int(meta.get("generation") or 0),
            observed_generation=int(status.get("observedGeneration") or 0),
        )


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    now: str,
    generation: int | None = None,
) -> list[dict[str, Any]]:
    """A copy of `conditions` with `type_` set; the transition time moves only on a flip."""
    value = "True" if status else "False"
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(dict(cond))
            continue
        found = True
        changed = cond.get("status") != value
        out.append(
            _condition(
                type_,
                value,
                reason,
                message,
                now if changed else str(cond.get("lastTransitionTime") or now),
                generation,
            )
        )
    if not found:
        out.append(_condition(type_, value, reason, message, now, generation))
    return out


def _condition(
    type_: str, status: str, reason: str, message: str, when: str, generation: int | None
) -> dict[str, Any]:
    cond: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": when,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def get_condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


@dataclass(frozen=True)
class Readiness:
    ready: bool
    progressing: bool
    degraded: bool
    reason: str
    message: str


def evaluate(workloads: Sequence[WorkloadState]) -> Readiness:
    """Ready when every workload has all desired replicas ready and up to date.

    Degraded when a workload that should run has no ready replica at all while
    it has replicas (pods exist but none is ready); Progressing otherwise.
    """
    missing = [w.name for w in workloads if not w.exists]
    if missing:
        return Readiness(False, True, False, "Creating", f"waiting for {', '.join(missing)}")
    stale = [w.name for w in workloads if w.generation > w.observed_generation]
    short = [w for w in workloads if w.ready < w.desired or w.updated < w.desired]
    if not stale and not short:
        return Readiness(
            True, False, False, "AllReplicasReady", "all stages and the gateway are ready"
        )
    dead = [w.name for w in short if w.desired > 0 and w.ready == 0 and w.replicas > 0]
    parts = [f"{w.name} {w.ready}/{w.desired} ready" for w in short]
    parts += [f"{name} not yet observed" for name in stale if name not in {w.name for w in short}]
    message = "; ".join(parts)
    if dead:
        return Readiness(False, True, True, "NoReadyReplicas", message)
    return Readiness(False, True, False, "RollingOut", message)


def apply_readiness(
    conditions: Sequence[Mapping[str, Any]], result: Readiness, now: str, generation: int
) -> list[dict[str, Any]]:
    out = set_condition(
        conditions, INVALID_SPEC, False, "SpecValid", "spec is valid", now, generation
    )
    out = set_condition(out, READY, result.ready, result.reason, result.message, now, generation)
    out = set_condition(
        out, PROGRESSING, result.progressing, result.reason, result.message, now, generation
    )
    return set_condition(
        out, DEGRADED, result.degraded, result.reason, result.message, now, generation
    )


def apply_invalid(
    conditions: Sequence[Mapping[str, Any]], problems: Sequence[str], now: str, generation: int
) -> list[dict[str, Any]]:
    message = "; ".join(problems)
    out = set_condition(
        conditions, INVALID_SPEC, True, "ValidationFailed", message, now, generation
    )
    return set_condition(out, READY, False, "InvalidSpec", message, now, generation)


# Autoscaling (written by the autoscale timer; reconcile keeps them as they are).
SCALING_ACTIVE = "ScalingActive"
SCALING_LIMITED = "ScalingLimited"
METRICS_AVAILABLE = "MetricsAvailable"
SCALING_CONDITIONS = (SCALING_ACTIVE, SCALING_LIMITED, METRICS_AVAILABLE)


@dataclass(frozen=True)
class Check:
    status: bool
    reason: str
    message: str


def scaling_checks(
    mode: str,
    profile: str | None,
    metrics_ok: bool,
    metrics_problem: str,
    limited: Mapping[str, str],
) -> tuple[Check, Check, Check]:
    """(ScalingActive, ScalingLimited, MetricsAvailable) for one autoscaler round.

    `limited` maps a stage to what capped it ("budget" or "max").
    """
    if metrics_ok:
        metrics = Check(True, "MetricsFresh", "load metrics are fresh")
    else:
        metrics = Check(False, "MetricsUnavailable", f"holding current sizes: {metrics_problem}")
    if profile is None:
        active = Check(
            False, "NoProfile", "set spec.autoscaling.profile or customProfile to size stages"
        )
    elif not metrics_ok:
        active = Check(False, "HoldingSizes", "no fresh metrics; sizes held")
    elif mode == "Advisory":
        active = Check(False, "Advisory", f"deciding with {profile}; not scaling (Advisory)")
    else:
        active = Check(True, "Scaling", f"scaling stages with {profile}")
    if limited:
        parts = ", ".join(f"{s} by {why}" for s, why in sorted(limited.items()))
        reasons = set(limited.values())
        reason = "BudgetReached" if "budget" in reasons else "MaxReplicasReached"
        limit = Check(True, reason, f"capped: {parts}")
    else:
        limit = Check(False, "WithinLimits", "no stage is capped by maxReplicas or the GPU budget")
    return active, limit, metrics


def apply_scaling(
    conditions: Sequence[Mapping[str, Any]],
    checks: tuple[Check, Check, Check],
    now: str,
    generation: int,
) -> list[dict[str, Any]]:
    out = [dict(c) for c in conditions]
    for type_, check in zip(SCALING_CONDITIONS, checks, strict=True):
        out = set_condition(out, type_, check.status, check.reason, check.message, now, generation)
    return out


def without_scaling(conditions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conditions minus the autoscaler's (mode Disabled)."""
    return [dict(c) for c in conditions if c.get("type") not in SCALING_CONDITIONS]
