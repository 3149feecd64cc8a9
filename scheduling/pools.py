"""Heterogeneous pools: one stage's instances spread over several accelerator types (pure).

A pool is the instances of one stage on one accelerator type; a stage's
capacity is the sum of its pools' rates. `plan_pools_for_gpus` gives every
(stage, pool) instances so that the pipeline's throughput (its slowest
stage) is the most the GPU budget and each type's count allow, then takes the
cheapest allocation at that throughput. `plan_pools_for_rate` takes the
cheapest mix of pools that carries a rate within the SLO: a request that
lands on a slow pool takes that pool's time, so a pool is used for a stage only
if the SLO holds on the slowest pools the plan uses (then each pool is sized as
its own queue for its share of the load, which a shared queue only beats).

`planner.plan_for_gpus`/`plan_for_rate` (one type per stage) stay what the
policies and the simulator start from: they keep a stage's type. A profile
with one accelerator type gets exactly their plan here.

The search is exact: for a throughput target each stage lists the fewest
instances per type mix that reach it, and the stages are combined keeping,
per GPUs used of the other types, the fewest of the last type (cost and GPUs
only grow with usage). Past GRID instances of a type in one stage, counts are
tried on a grid of GRID values, so a very large budget of uncounted types is
planned to within about 1/GRID of a pool.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from disagfusion.scheduling.planner import (
    _REL_TIE,
    Mix,
    Plan,
    PoolPlan,
    StagePlan,
    plan_for_gpus,
)
from disagfusion.scheduling.profile import (
    Profile,
    batch_at_rate,
    batch_capacity,
    batch_factor,
)
from disagfusion.scheduling.stages import STAGES

GRID = 48  # instance counts tried per (stage, type) before they are spaced out
_SEARCH_STEPS = 80  # bisection steps on the throughput (ends far sooner on a tie)

Counts = dict[str, int]  # accelerator -> instances, for one stage
Allocation = dict[str, Counts]  # stage -> its pools
Usage = tuple[int, ...]  # GPUs per accelerator type, in profile order
T = TypeVar("T")


@dataclass(frozen=True)
class StageOption:
    """One stage on one accelerator type, at its mean service time over the mix."""

    accelerator: str
    gpus: int  # per instance
    seconds: float  # batch-1 mean over the mix
    rate: float  # requests/s one instance completes with a full queue (inf: zero cost)


def mean_time(profile: Profile, stage: str, accelerator: str, mix: Mix) -> float:
    """Σ w·t(shape) / Σ w of one stage on one accelerator."""
    total = sum(w for _, w in mix)
    if total <= 0:
        raise ValueError("the request mix has no weight")
    return sum(w * profile.service_time(stage, accelerator, s) for s, w in mix) / total


def stage_options(profile: Profile, mix: Mix) -> dict[str, list[StageOption]]:
    out: dict[str, list[StageOption]] = {}
    for stage in STAGES:
        out[stage] = []
        for acc in profile.options(stage):
            t, cost = mean_time(profile, stage, acc, mix), profile.stages[stage][acc]
            rate = batch_capacity(t, cost.batch, cost.max_batch)[0] if t > 0 else math.inf
            out[stage].append(StageOption(acc, profile.gpus_per_instance(stage, acc), t, rate))
    return out


def grid(most: int) -> range | list[int]:
    if most < GRID:
        return range(most + 1)
    return sorted({round(i * most / (GRID - 1)) for i in range(GRID)})


def _needed(load: float, rate: float) -> int:
    """The fewest instances at `rate` each that carry `load` (the slack absorbs float error)."""
    if load <= 0:
        return 0
    return 1 if math.isinf(rate) else max(1, math.ceil(load / rate * (1 - _REL_TIE)))


def _stage_mixes(options: Sequence[StageOption], target: float, limits: Counts) -> Iterator[Counts]:
    """Instance counts per type that reach `target` with no last-type instance to spare."""
    *first, last = options
    ranges = [grid(min(limits[o.accelerator] // o.gpus, _needed(target, o.rate))) for o in first]
    for counts in itertools.product(*ranges):
        left = target - sum(n * o.rate for n, o in zip(counts, first, strict=True))
        n_last = _needed(left, last.rate)
        if sum(counts) + n_last == 0:
            n_last = 1  # every stage runs somewhere
        if n_last * last.gpus <= limits[last.accelerator]:
            yield {o.accelerator: n for o, n in zip(options, (*counts, n_last), strict=True)}


def cheapest(
    profile: Profile,
    points: Mapping[str, Sequence[tuple[Usage, T]]],
    limits: Counts,
    budget: int,
) -> dict[str, T] | None:
    """The cheapest (cost, then GPUs) choice of one point (GPUs per type, what it is)
    per stage within each type's limit and the budget; None if none fits."""
    names = [a.name for a in profile.accelerators]
    cap = tuple(limits[a] for a in names)
    # Per usage of every type but the last: the least of the last type, and how.
    states: dict[Usage, tuple[int, dict[str, T]]] = {(0,) * (len(names) - 1): (0, {})}
    for stage in STAGES:
        grown: dict[Usage, tuple[int, dict[str, T]]] = {}
        for key, (last, alloc) in states.items():
            for usage, counts in points[stage]:
                total = (*key, last)
                new = tuple(a + b for a, b in zip(total, usage, strict=True))
                if any(n > c for n, c in zip(new, cap, strict=True)) or sum(new) > budget:
                    continue
                held = grown.get(new[:-1])
                if held is None or new[-1] < held[0]:
                    grown[new[:-1]] = (new[-1], {**alloc, stage: counts})
        states = grown
    prices = [a.cost_per_hour for a in profile.accelerators]

    def cost(item: tuple[Usage, tuple[int, dict[str, T]]]) -> tuple[float, int]:
        usage = (*item[0], item[1][0])
        return sum(u * p for u, p in zip(usage, prices, strict=True)), sum(usage)

    return min(states.items(), key=cost)[1][1] if states else None


def usage(profile: Profile, options: Sequence[StageOption], counts: Counts) -> Usage:
    per = {o.accelerator: o.gpus for o in options}
    return tuple(counts.get(a.name, 0) * per.get(a.name, 0) for a in profile.accelerators)


def _allocate(
    profile: Profile, options: Mapping[str, list[StageOption]], target: float, budget: int
) -> Allocation | None:
    limits = limits_of(profile, budget)
    points = {
        s: [(usage(profile, opts, c), c) for c in _stage_mixes(opts, target, limits)]
        for s, opts in options.items()
    }
    return cheapest(profile, points, limits, budget)


def limits_of(profile: Profile, budget: int) -> Counts:
    return {
        a.name: budget if a.count is None else min(a.count, budget) for a in profile.accelerators
    }


def _capacity(options: Mapping[str, list[StageOption]], alloc: Allocation) -> float:
    return min(
        sum(n * o.rate for o in options[s] if (n := alloc[s].get(o.accelerator, 0))) for s in STAGES
    )


def plan_pools_for_gpus(profile: Profile, gpus: int, mix: Mix | None = None) -> Plan:
    """The most throughput `gpus` GPUs and the types' counts give when a stage may run
    on several types at once (ties: the cheaper plan, then fewer GPUs)."""
    if len(profile.accelerators) < 2:
        return plan_for_gpus(profile, gpus, mix)
    mix = mix or ((profile.default_request, 1.0),)
    options = stage_options(profile, mix)
    best = _allocate(profile, options, 1e-12, gpus)  # one instance of every stage
    if best is None:
        smallest = sum(min(o.gpus for o in options[s]) for s in STAGES)
        why = (
            f"the smallest pipeline needs {smallest} GPUs"
            if smallest > gpus
            else "no mix of accelerators fits their counts"
        )
        raise ValueError(
            f"a budget of {gpus} GPUs cannot hold one instance of every stage of "
            f"{profile.name}: {why}"
        )
    low = _capacity(options, best)
    limits = limits_of(profile, gpus)
    high = min(sum(limits[o.accelerator] // o.gpus * o.rate for o in options[s]) for s in STAGES)
    for _ in range(_SEARCH_STEPS):
        if not math.isfinite(low) or high <= low * (1 + _REL_TIE):
            break
        mid = (low + high) / 2
        found = _allocate(profile, options, mid, gpus)
        if found is None:
            high = mid
        else:
            best, low = found, _capacity(options, found)
    if math.isfinite(low):  # the cheapest allocation that carries the most
        best = _allocate(profile, options, low * (1 - _REL_TIE), gpus) or best
    load = _capacity(options, best)
    return build_plan(profile, mix, _saturated_batches(profile, options, best, load))


def _saturated_batches(
    profile: Profile, options: Mapping[str, list[StageOption]], alloc: Allocation, load: float
) -> dict[str, list[tuple[str, int, int]]]:
    """(type, instances, batch) per stage: each pool takes its share of `load` by its rate
    (work-conserving dispatch), so the bottleneck's pools run their best batch."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for s in STAGES:
        used = [(o, alloc[s][o.accelerator]) for o in options[s] if alloc[s].get(o.accelerator)]
        stage_rate = sum(n * o.rate for o, n in used)
        out[s] = []
        for o, n in used:
            cost = profile.stages[s][o.accelerator]
            share = load * o.rate / stage_rate if math.isfinite(stage_rate) else 0.0
            batch = batch_at_rate(share, o.seconds, cost.batch, cost.max_batch)
            out[s].append((o.accelerator, n, batch if cost.batching else 1))
    return out


def build_plan(
    profile: Profile, mix: Mix, pools: Mapping[str, Sequence[tuple[str, int, int]]]
) -> Plan:
    """The plan of (type, instances, batch) per stage."""
    stages: dict[str, StagePlan] = {}
    for s in STAGES:
        parts = []
        for acc, n, b in pools[s]:
            cost, t1 = profile.stages[s][acc], mean_time(profile, s, acc, mix)
            t = t1 * batch_factor(cost.batch, b) / b if b > 1 else t1
            parts.append(
                PoolPlan(
                    accelerator=acc,
                    replicas=n,
                    gpus_per_instance=profile.gpus_per_instance(s, acc),
                    service_time_s=t,
                    throughput_rps=n / t if t > 0 else math.inf,
                    batch=b,
                    max_batch=cost.max_batch if cost.batching else 1,
                )
            )
        main = max(parts, key=lambda p: p.replicas)  # first (profile order) on ties
        replicas = sum(p.replicas for p in parts)
        rate = sum(p.throughput_rps for p in parts)
        stages[s] = StagePlan(
            replicas=replicas,
            accelerator=main.accelerator,
            gpus_per_instance=main.gpus_per_instance,
            service_time_s=replicas / rate if math.isfinite(rate) else 0.0,
            throughput_rps=rate,
            batch=main.batch,
            max_batch=max(p.max_batch for p in parts),
            pools=tuple(parts),
        )
    bottleneck = min(STAGES, key=lambda s: stages[s].throughput_rps)
    held = [p for sp in stages.values() for p in sp.pools]
    return Plan(
        stages=stages,
        throughput_rps=stages[bottleneck].throughput_rps,
        gpus=sum(p.replicas * p.gpus_per_instance for p in held),
        cost_per_hour=sum(
            p.replicas * p.gpus_per_instance * profile.accelerator(p.accelerator).cost_per_hour
            for p in held
        ),
        bottleneck=bottleneck,
    )
