"""Static capacity planning: instances per stage for a GPU budget or a request rate (pure).

A stage of n instances with mean service time t serves n/t requests/s; the
pipeline serves the minimum over its stages. `plan_for_gpus` maximises that
minimum under a GPU budget (the balance rule E:D ≈ t_e:t_d of docs/calibration.md
falls out of it); `plan_for_rate` finds the cheapest pipeline that carries a
rate with a queueing delay the SLO can absorb. With several accelerator types,
every assignment of one type per stage is tried.

Batching (a stage whose profile allows more than one request per call): a rate
plan sizes each stage for the batch its instances settle at under that rate
(capacity.batched_servers_for), never the best case; a budget plan's throughput
is the most the pipeline carries, when the bottleneck's queue never empties and
it runs its largest batch, and the other stages run the batch that rate forms.
A mix is batched at its mean service time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from disagfusion.scheduling.budget import gpus_by_accelerator, max_min, within_counts
from disagfusion.scheduling.capacity import batched_servers_for
from disagfusion.scheduling.profile import (
    Profile,
    RequestShape,
    StageCost,
    batch_at_rate,
    batch_capacity,
    batch_factor,
    parse_slo,
)
from disagfusion.scheduling.stages import STAGES

Mix = tuple[tuple[RequestShape, float], ...]
# Share of the SLO's slack (SLO minus unloaded latency) that queueing may use: the
# rest absorbs bursts, hand-off jitter and the model's own error.
WAIT_SHARE_OF_SLACK = 0.1
LIGHT_STAGE_WAIT_SHARE = 0.25  # most of a wait budget a light stage may take
_REL_TIE = 1e-9  # throughputs this close count as equal (then the cheaper plan wins)


@dataclass(frozen=True)
class PoolPlan:
    """The instances of one stage on one accelerator type (scheduling/pools.py)."""

    accelerator: str
    replicas: int
    gpus_per_instance: int
    service_time_s: float  # instance-seconds per request on this type, t(B)/B
    throughput_rps: float  # replicas / service time
    batch: int = 1
    max_batch: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "accelerator": self.accelerator,
            "replicas": self.replicas,
            "gpus_per_instance": self.gpus_per_instance,
            "throughput_rps": _finite(self.throughput_rps),
            **({"batch": self.batch, "max_batch": self.max_batch} if self.max_batch > 1 else {}),
        }


@dataclass(frozen=True)
class StagePlan:
    replicas: int
    accelerator: str
    gpus_per_instance: int
    service_time_s: float  # mean over the mix: instance-seconds per request, t(B)/B
    throughput_rps: float  # replicas / service time (inf for a zero-cost stage)
    batch: int = 1  # requests per call the plan assumes
    max_batch: int = 1  # the most the profile allows (1: no batching)
    # Set by the pooled planner (scheduling/pools.py) only: the stage's instances per
    # accelerator type. Then `replicas` is their total, `accelerator`, `gpus_per_instance`
    # and `batch` are the largest pool's, and `service_time_s` is replicas / throughput.
    pools: tuple[PoolPlan, ...] = ()


@dataclass(frozen=True)
class Plan:
    stages: dict[str, StagePlan]
    throughput_rps: float
    gpus: int
    cost_per_hour: float
    bottleneck: str

    def to_json(self) -> dict[str, Any]:
        return {
            "stages": {
                name: {
                    "replicas": s.replicas,
                    "accelerator": s.accelerator,
                    "gpus_per_instance": s.gpus_per_instance,
                    "service_time_s": round(s.service_time_s, 6),
                    "throughput_rps": _finite(s.throughput_rps),
                    **({"batch": s.batch, "max_batch": s.max_batch} if s.max_batch > 1 else {}),
                    **({"pools": [p.to_json() for p in s.pools]} if s.pools else {}),
                }
                for name, s in self.stages.items()
            },
            "throughput_rps": _finite(self.throughput_rps),
            "gpus": self.gpus,
            "cost_per_hour": round(self.cost_per_hour, 4),
            "bottleneck": self.bottleneck,
        }


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None  # JSON has no Infinity


def mean_service_times(
    profile: Profile, assignment: Mapping[str, str], mix: Mix
) -> dict[str, float]:
    """Per stage: Σ w·t(shape) / Σ w on the assigned accelerator."""
    total = sum(w for _, w in mix)
    if total <= 0:
        raise ValueError("the request mix has no weight")
    return {
        s: sum(w * profile.service_time(s, assignment[s], shape) for shape, w in mix) / total
        for s in STAGES
    }


def _assignments(profile: Profile) -> list[dict[str, str]]:
    options = [profile.options(s) for s in STAGES]
    return [dict(zip(STAGES, combo, strict=True)) for combo in itertools.product(*options)]


def _cost(profile: Profile, assignment: Mapping[str, str], stage: str) -> StageCost:
    return profile.stages[stage][assignment[stage]]


def _per_request(
    profile: Profile, assignment: Mapping[str, str], stage: str, t: float, b: int
) -> float:
    """Instance-seconds one request costs at batch `b` when one alone takes `t`."""
    return t * batch_factor(_cost(profile, assignment, stage).batch, b) / b if b > 1 else t


def _build(
    profile: Profile,
    assignment: Mapping[str, str],
    times: Mapping[str, float],
    n: Mapping[str, int],
    batches: Mapping[str, int] | None = None,
) -> Plan:
    """`times` are batch-1 seconds; each stage runs at `batches` (default 1)."""
    stages = {}
    for s in STAGES:
        b, cost = (batches or {}).get(s, 1), _cost(profile, assignment, s)
        t = _per_request(profile, assignment, s, times[s], b)
        stages[s] = StagePlan(
            replicas=n[s],
            accelerator=assignment[s],
            gpus_per_instance=profile.gpus_per_instance(s, assignment[s]),
            service_time_s=t,
            throughput_rps=n[s] / t if t > 0 else math.inf,
            batch=b,
            max_batch=cost.max_batch if cost.batching else 1,
        )
    bottleneck = min(STAGES, key=lambda s: stages[s].throughput_rps)  # first on ties
    return Plan(
        stages=stages,
        throughput_rps=stages[bottleneck].throughput_rps,
        gpus=sum(p.replicas * p.gpus_per_instance for p in stages.values()),
        cost_per_hour=sum(
            p.replicas * p.gpus_per_instance * profile.accelerator(p.accelerator).cost_per_hour
            for p in stages.values()
        ),
        bottleneck=bottleneck,
    )


def _fits_counts(profile: Profile, plan: Plan) -> bool:
    held = ((p.accelerator, p.replicas * p.gpus_per_instance) for p in plan.stages.values())
    return within_counts(gpus_by_accelerator(held), profile.accelerator_counts())


def _cheaper(a: Plan, b: Plan) -> bool:
    return (a.cost_per_hour, a.gpus) < (b.cost_per_hour, b.gpus)


def plan_for_gpus(profile: Profile, gpus: int, mix: Mix | None = None) -> Plan:
    """The most throughput `gpus` GPUs can give (ties: the cheaper plan).

    Instances that would not raise the bottleneck's throughput are left out,
    so a plan may use fewer GPUs than the budget.
    """
    mix = mix or ((profile.default_request, 1.0),)
    counts = profile.accelerator_counts()
    best: Plan | None = None
    smallest = math.inf
    for assignment in _assignments(profile):
        times = mean_service_times(profile, assignment, mix)
        per = {s: profile.gpus_per_instance(s, assignment[s]) for s in STAGES}
        smallest = min(smallest, sum(per.values()))
        best_batch = {s: _saturated(profile, assignment, s, t) for s, t in times.items()}
        rates = {s: r for s, (r, _) in best_batch.items()}
        ones = {s: 1 for s in STAGES}
        n = max_min(rates, per, assignment, gpus, ones, accelerator_counts=counts)
        plan = _build(profile, assignment, times, n, {s: b for s, (_, b) in best_batch.items()})
        if plan.gpus > gpus or not _fits_counts(profile, plan):
            continue  # one instance per stage does not fit this assignment
        plan = _trim(profile, assignment, times, plan)
        if best is None or _better(plan, best):
            best = plan
    if best is None:
        why = (
            f"the smallest pipeline needs {int(smallest)} GPUs"
            if smallest > gpus
            else "no assignment of accelerators fits their counts"
        )
        raise ValueError(
            f"a budget of {gpus} GPUs cannot hold one instance of every stage of "
            f"{profile.name}: {why}"
        )
    return best


def _saturated(
    profile: Profile, assignment: Mapping[str, str], stage: str, t: float
) -> tuple[float, int]:
    """(requests/s one instance completes with a queue that never empties, at what batch)."""
    if t <= 0:
        return math.inf, 1
    cost = _cost(profile, assignment, stage)
    return batch_capacity(t, cost.batch, cost.max_batch)


def _trim(
    profile: Profile, assignment: Mapping[str, str], times: Mapping[str, float], plan: Plan
) -> Plan:
    """Drop instances of non-bottleneck stages that the bottleneck's throughput does not need."""
    target = plan.throughput_rps
    if not math.isfinite(target):
        return plan
    n = {s: p.replicas for s, p in plan.stages.items()}
    batches = {}
    for s in STAGES:
        cost, t = _cost(profile, assignment, s), times[s]
        # The fewest instances with n·rate >= target; the small slack absorbs float error.
        per_request = 1 / _saturated(profile, assignment, s, t)[0] if cost.batching else t
        need = max(1, math.ceil(target * per_request * (1 - _REL_TIE)))
        n[s] = min(n[s], need)
        batches[s] = batch_at_rate(target / n[s], t, cost.batch, cost.max_batch)
    trimmed = _build(profile, assignment, times, n, batches)
    # A stage trimmed to exactly the target must not steal the bottleneck by rounding.
    return replace(trimmed, throughput_rps=target, bottleneck=plan.bottleneck)


def _better(a: Plan, b: Plan) -> bool:
    if a.throughput_rps > b.throughput_rps * (1 + _REL_TIE):
        return True
    if b.throughput_rps > a.throughput_rps * (1 + _REL_TIE):
        return False
    return _cheaper(a, b)


def slo_slack(
    profile: Profile, assignment: Mapping[str, str], mix: Mix, slo: str
) -> tuple[float, float]:
    """(slack, unloaded latency): seconds a mean request may queue in all under the SLO."""
    kind, value = parse_slo(slo)
    total_w = sum(w for _, w in mix) or 1.0
    unloaded = sum(w * profile.unloaded_latency(shape, assignment) for shape, w in mix) / total_w
    slack = unloaded * (value - 1) if kind == "slowdown" else value - unloaded
    return slack, unloaded


def split_wait(times: Mapping[str, float], total_wait: float) -> dict[str, float]:
    """A queueing-wait budget split over stages by their share of the service time.

    A light stage may still wait about its own service time (up to a quarter of
    the budget): a split by time alone would give a 0.3 s encoder 0.1 s, and an
    idle second encoder would be kept to protect it.
    """
    busy = sum(times.values())
    cap = LIGHT_STAGE_WAIT_SHARE * total_wait
    return {
        s: max(total_wait * (t / busy if busy > 0 else 1 / len(times)), min(t, cap))
        for s, t in times.items()
    }


def stage_wait_budgets(
    profile: Profile, assignment: Mapping[str, str], mix: Mix, slo: str | None
) -> dict[str, float]:
    """Mean queueing delay each stage may add: WAIT_SHARE_OF_SLACK of the SLO's slack,
    split over the stages (`split_wait`). No SLO: no wait limit."""
    text = slo or profile.default_slo
    if text is None:
        return {s: math.inf for s in STAGES}
    slack, unloaded = slo_slack(profile, assignment, mix, text)
    if slack <= 0:
        raise ValueError(
            f"SLO {text} leaves no room for queueing: an idle pipeline already takes "
            f"{unloaded:.3g} s per request"
        )
    return split_wait(mean_service_times(profile, assignment, mix), WAIT_SHARE_OF_SLACK * slack)


def plan_for_rate(
    profile: Profile,
    rate_rps: float,
    mix: Mix | None = None,
    slo: str | None = None,
    target_utilization: float = 0.8,
) -> Plan:
    """The cheapest plan (cost per hour, then GPUs) whose every stage carries `rate_rps`
    at no more than `target_utilization` and within its share of the SLO's slack."""
    if not rate_rps > 0 or not math.isfinite(rate_rps):
        raise ValueError(f"rate must be a positive number of requests/s, got {rate_rps}")
    if not 0 < target_utilization <= 1:
        raise ValueError(f"target utilization must be in (0, 1], got {target_utilization}")
    mix = mix or ((profile.default_request, 1.0),)
    best: Plan | None = None
    reasons: list[str] = []
    for assignment in _assignments(profile):
        times = mean_service_times(profile, assignment, mix)
        try:
            waits = stage_wait_budgets(profile, assignment, mix, slo)
        except ValueError as err:
            reasons.append(str(err))
            continue
        pools = {
            s: batched_servers_for(
                rate_rps,
                times[s],
                waits[s],
                target_utilization,
                _cost(profile, assignment, s).batch,
                _cost(profile, assignment, s).max_batch,
            )
            for s in STAGES
        }
        n = {s: max(1, p.servers) for s, p in pools.items()}
        plan = _build(profile, assignment, times, n, {s: p.batch for s, p in pools.items()})
        if not _fits_counts(profile, plan):
            pool = ", ".join(f"{a.count} {a.name}" for a in profile.accelerators if a.count)
            reasons.append(f"more GPUs than the pool has ({pool})")
            continue
        if best is None or _cheaper(plan, best):
            best = plan
    if best is None:
        raise ValueError(f"cannot carry {rate_rps} req/s: " + "; ".join(dict.fromkeys(reasons)))
    return best
