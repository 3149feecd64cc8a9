"""GPU-budget primitives shared by the planner and every policy (pure).

After NVIDIA Dynamo's planner `core/budget.py`: one allocator, `grow`, and
the priorities its callers give it. Each stage starts at a floor; then one
instance at a time goes to the stage with the lowest priority (ties: the
earlier stage) while that stage stays under its ceiling, the GPU budget and
its accelerator type's count.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping

from disagfusion.scheduling.stages import STAGES

# (stage, instances it has now) -> the lower, the sooner it grows.
Priority = Callable[[str, int], float]
NO_BUDGET = 10**6  # the GPUs a policy may plan with when neither its knobs nor the profile say


def in_stage_order(stage: str, count: int) -> float:
    """Every stage alike: ties go to the earlier stage, so growth follows stage order."""
    return 0.0


def grow(
    start: Mapping[str, int],
    ceiling: Mapping[str, float],
    gpus_per_instance: Mapping[str, int],
    accelerators: Mapping[str, str],
    budget_gpus: int,
    priority: Priority = in_stage_order,
    accelerator_counts: Mapping[str, int | None] | None = None,
    stop_at_first_misfit: bool = False,
) -> dict[str, int]:
    """Instances per stage: `start`, grown one at a time by `priority` within the limits.

    Every stage keeps its start even past the budget (the caller checks). A
    stage missing from `ceiling` may grow without limit but the budget's.
    When the next instance of a stage does not fit the budget or its type's
    count, that stage stops growing and the others go on; with
    `stop_at_first_misfit` all growth stops there, so what is granted is the
    longest prefix of the priority order that fits (trimming the last growth first).
    """
    order = [s for s in STAGES if s in start] + sorted(set(start) - set(STAGES))
    counts = {s: start[s] for s in order}
    left = budget_gpus - sum(counts[s] * gpus_per_instance[s] for s in order)
    type_left: dict[str, float] = {}
    for s in order:
        acc = accelerators[s]
        limit = (accelerator_counts or {}).get(acc)
        type_left.setdefault(acc, math.inf if limit is None else limit)
        type_left[acc] -= counts[s] * gpus_per_instance[s]

    def cap(s: str) -> float:
        return ceiling.get(s, math.inf)

    # A stage at its ceiling never enters the heap: a NaN priority there would break it.
    heap = [(priority(s, counts[s]), i, s) for i, s in enumerate(order) if counts[s] < cap(s)]
    heapq.heapify(heap)
    while heap:
        _, i, s = heap[0]
        need = gpus_per_instance[s]
        if counts[s] + 1 > cap(s):
            heapq.heappop(heap)
            continue
        if need > left or need > type_left[accelerators[s]]:
            if stop_at_first_misfit:
                break
            # Budgets only shrink, so a stage that cannot grow now never will.
            heapq.heappop(heap)
            continue
        counts[s] += 1
        left -= need
        type_left[accelerators[s]] -= need
        heapq.heapreplace(heap, (priority(s, counts[s]), i, s))
    return counts


def max_min(
    capacity_rps: Mapping[str, float],
    gpus_per_instance: Mapping[str, int],
    accelerators: Mapping[str, str],
    budget_gpus: int,
    minimum: Mapping[str, int],
    ceiling: Mapping[str, float] | None = None,
    accelerator_counts: Mapping[str, int | None] | None = None,
) -> dict[str, int]:
    """The most pipeline throughput: grow the stage with the lowest n·capacity first.

    Every stage of `capacity_rps` starts at its minimum. Capacity 0, NaN or
    infinite means more instances cannot change the pipeline's throughput,
    so such a stage keeps its minimum.
    """
    start = {s: max(0, minimum.get(s, 0)) for s in capacity_rps}
    limits = dict(ceiling or {})
    for s, rate in capacity_rps.items():
        if not 0 < rate < math.inf:  # NaN fails both comparisons
            limits[s] = start[s]

    def throughput(s: str, n: int) -> float:
        return n * capacity_rps[s]

    return grow(
        start, limits, gpus_per_instance, accelerators, budget_gpus, throughput, accelerator_counts
    )


def most_starved_first(
    wanted: Mapping[str, int],
    current: Mapping[str, int],
    gpus_per_instance: Mapping[str, int],
    accelerators: Mapping[str, str],
    budget_gpus: int,
    accelerator_counts: Mapping[str, int | None] | None = None,
) -> dict[str, int]:
    """Shrinks apply; growth goes one instance at a time to the stage furthest
    (by share) from what it wants, while the budget and the counts have room."""
    start = {s: min(wanted[s], current[s]) for s in wanted}

    def share(s: str, n: int) -> float:
        return n / wanted[s]

    return grow(
        start, wanted, gpus_per_instance, accelerators, budget_gpus, share, accelerator_counts
    )


def gpus_by_accelerator(held: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Total GPUs per accelerator type of (type, GPUs) pairs."""
    used: dict[str, int] = {}
    for acc, gpus in held:
        used[acc] = used.get(acc, 0) + gpus
    return used


def within_counts(used: Mapping[str, int], accelerator_counts: Mapping[str, int | None]) -> bool:
    """Whether every type's GPUs fit how many of it the cluster has."""
    return all((limit := accelerator_counts[a]) is None or n <= limit for a, n in used.items())
