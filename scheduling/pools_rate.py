"""The cheapest mix of pools that carries a request rate within the SLO (pure).

Each stage picks a set of accelerator types to run on (every non-empty set
is tried). A request runs on whichever instance is free, so it may land on the
slowest type of every stage: the SLO's slack is what is left after that path's
idle latency (for a slowdown SLO, against the fastest path, what an idle
pipeline gives), and a set whose slow path leaves none is not used. Each pool
is sized as its own queue for its share of the load, within the stage's wait
budget and the utilization target (a shared queue only does better): the
pools but the last carry the most their instance count can, the last the rest.
Then scheduling/pools.py's search takes the cheapest choice within the counts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

from disagfusion.scheduling.capacity import Pool, batched_servers_for
from disagfusion.scheduling.planner import (
    WAIT_SHARE_OF_SLACK,
    Mix,
    Plan,
    mean_service_times,
    plan_for_rate,
    split_wait,
)
from disagfusion.scheduling.pools import (
    StageOption,
    build_plan,
    cheapest,
    grid,
    stage_options,
    usage,
)
from disagfusion.scheduling.profile import Profile, parse_slo
from disagfusion.scheduling.stages import STAGES

UNCOUNTED = 10**9  # the GPUs a type without a count may give (a rate plan has no budget)
_BISECTION_STEPS = 40
Pools = tuple[tuple[str, int, int], ...]  # (type, instances, batch) of one stage


def plan_pools_for_rate(
    profile: Profile,
    rate_rps: float,
    mix: Mix | None = None,
    slo: str | None = None,
    target_utilization: float = 0.8,
) -> Plan:
    """The cheapest plan (cost per hour, then GPUs) that carries `rate_rps` when a stage
    may run on several types at once, every pool at no more than `target_utilization`
    and within the stage's share of the SLO's slack on its slowest pools."""
    if len(profile.accelerators) < 2:
        return plan_for_rate(profile, rate_rps, mix, slo, target_utilization)
    if not rate_rps > 0 or not math.isfinite(rate_rps):
        raise ValueError(f"rate must be a positive number of requests/s, got {rate_rps}")
    if not 0 < target_utilization <= 1:
        raise ValueError(f"target utilization must be in (0, 1], got {target_utilization}")
    mix = mix or ((profile.default_request, 1.0),)
    options = stage_options(profile, mix)
    limits = {a.name: UNCOUNTED if a.count is None else a.count for a in profile.accelerators}
    best: Plan | None = None
    reasons: list[str] = []
    for chosen in itertools.product(*(_subsets(options[s]) for s in STAGES)):
        sets = dict(zip(STAGES, chosen, strict=True))
        try:
            waits = wait_budgets(profile, mix, slo, sets)
        except ValueError as err:
            reasons.append(str(err))
            continue
        points = {
            s: [
                (usage(profile, sets[s], {acc: n for acc, n, _ in pools}), pools)
                for pools in _stage_pools(
                    profile, s, sets[s], rate_rps, waits[s], target_utilization, limits
                )
            ]
            for s in STAGES
        }
        found = cheapest(profile, points, limits, UNCOUNTED * len(limits))
        if found is None:
            pool = ", ".join(f"{a.count} {a.name}" for a in profile.accelerators if a.count)
            reasons.append(f"more GPUs than the pool has ({pool})")
            continue
        plan = build_plan(profile, mix, found)
        if best is None or (plan.cost_per_hour, plan.gpus) < (best.cost_per_hour, best.gpus):
            best = plan
    if best is None:
        raise ValueError(f"cannot carry {rate_rps} req/s: " + "; ".join(dict.fromkeys(reasons)))
    return best


def _subsets(options: Sequence[StageOption]) -> list[tuple[StageOption, ...]]:
    return [c for k in range(1, len(options) + 1) for c in itertools.combinations(options, k)]


def wait_budgets(
    profile: Profile, mix: Mix, slo: str | None, sets: Mapping[str, Sequence[StageOption]]
) -> dict[str, float]:
    """Mean queueing delay each stage may add, from the slack its slowest pools leave."""
    text = slo or profile.default_slo
    if text is None:
        return {s: math.inf for s in STAGES}
    slowest = {s: max(opts, key=lambda o: o.seconds).accelerator for s, opts in sets.items()}
    fastest = {s: min(opts, key=lambda o: o.seconds).accelerator for s, opts in sets.items()}
    kind, value = parse_slo(text)
    total_w = sum(w for _, w in mix) or 1.0

    def idle(accs: Mapping[str, str]) -> float:
        return sum(w * profile.unloaded_latency(shape, accs) for shape, w in mix) / total_w

    worst, best = idle(slowest), idle(fastest)
    # (value - 1)·worst exactly when every stage has one type, as planner.slo_slack.
    slack = value - worst if kind == "seconds" else (value - 1) * worst - value * (worst - best)
    if slack <= 0:
        on = " on its slowest pools" if slowest != fastest else ""
        raise ValueError(
            f"SLO {text} leaves no room for queueing: an idle pipeline already takes "
            f"{worst:.3g} s per request{on}"
        )
    times = mean_service_times(profile, slowest, mix)
    return split_wait(times, WAIT_SHARE_OF_SLACK * slack)


def _stage_pools(
    profile: Profile,
    stage: str,
    options: Sequence[StageOption],
    rate: float,
    wait: float,
    utilization: float,
    limits: Mapping[str, int],
) -> Iterator[Pools]:
    """Every way these pools (each at least one instance) carry `rate` within the limits."""

    def size(o: StageOption, load: float) -> Pool:
        cost = profile.stages[stage][o.accelerator]
        return batched_servers_for(load, o.seconds, wait, utilization, cost.batch, cost.max_batch)

    def fits(o: StageOption, n: int) -> bool:
        return n * o.gpus <= limits[o.accelerator]

    *first, last = options
    # A first pool with as many instances as carry the whole rate leaves the last none.
    ranges = [grid(min(limits[o.accelerator] // o.gpus, size(o, rate).servers - 1)) for o in first]
    for counts in itertools.product(*ranges):
        if any(n < 1 for n in counts):
            continue
        carried = [_most_load(size, o, n, rate) for o, n in zip(first, counts, strict=True)]
        left = rate - sum(load for load, _ in carried)
        if left <= 0:
            continue  # the last pool would be idle: a smaller set covers this
        pool = size(last, left)
        n_last = max(1, pool.servers)
        if fits(last, n_last):
            head = tuple(
                (o.accelerator, n, b) for o, n, (_, b) in zip(first, counts, carried, strict=True)
            )
            yield (*head, (last.accelerator, n_last, pool.batch))


def _most_load(
    size: Callable[[StageOption, float], Pool], option: StageOption, servers: int, rate: float
) -> tuple[float, int]:
    """(the most load `servers` instances carry within the limits, at what batch), by
    bisection: a pool's size only grows with its load."""
    low, high, batch = 0.0, min(rate, servers * option.rate), 1
    if size(option, high).servers <= servers:
        return high, size(option, high).batch
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        pool = size(option, mid)
        if pool.servers <= servers:
            low, batch = mid, pool.batch
        else:
            high = mid
    return low, batch
