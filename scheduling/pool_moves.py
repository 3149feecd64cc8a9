"""Which pool of a stage grows or shrinks when the stage's capacity must move (pure).

A stage's pools are counted in units of one reference type's instance (its
main type): an instance of type a is worth `speed[a]` = t_ref / t_a of them.
Growing adds the type that is cheapest per unit of work (price x GPUs / speed)
among those whose requests still meet the SLO; shrinking removes the most
expensive per unit of work first, a type that misses the SLO before any. A
type that misses the SLO is a last resort: added only when no type that meets
it has room (more capacity serves more requests than a longer queue), and
swapped out as soon as one has. A pool only grows or only shrinks in one
decision; the per-type counts, the GPU budget and per-type maxima hold across
all stages, and stages short of their target grow bottleneck first (the lowest
share of their target).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

Sizes = dict[str, int]  # accelerator -> instances, one stage

_EPS = 1e-9
# A slower type goes first only when it is over 10 % cheaper per unit of work (tuned
# with `disagfusion simulate` on qwen-image-h100-l40s: an L40S denoiser, 3 % cheaper
# per unit of work than an H100's, cost more in all once its queueing was paid for).
SLOWER_TYPE_PENALTY = 1.1


@dataclass(frozen=True)
class PoolType:
    """One accelerator type a stage may run on."""

    accelerator: str
    speed: float  # instances of the stage's fastest type one instance is worth
    gpus: int  # per instance
    price: float  # per GPU-hour
    fits_slo: bool  # a request served here can still meet the SLO
    slower: bool = False  # slower than the stage's fastest type

    @property
    def cost_per_work(self) -> float:
        """Price per unit of work; a slower type's counts SLOWER_TYPE_PENALTY more: the
        same queueing wait takes more headroom on slower instances (Erlang C)."""
        raw = self.price * self.gpus / self.speed
        return raw * SLOWER_TYPE_PENALTY if self.slower else raw


@dataclass(frozen=True)
class StageTarget:
    types: tuple[PoolType, ...]  # every type the stage may run on
    current: Mapping[str, int]  # instances per type now
    target: float  # capacity wanted, in fastest-type instances
    minimum: int = 1  # instances, all types together
    maximum: int = 10**9
    type_max: Mapping[str, int] = field(default_factory=dict)  # accelerator -> instances


@dataclass
class Moves:
    sizes: dict[str, Sizes] = field(default_factory=dict)
    limited: dict[str, str] = field(default_factory=dict)  # stage -> "budget" or "max"


def capacity(types: tuple[PoolType, ...], sizes: Mapping[str, int]) -> float:
    """Fastest-type instances the pools are worth."""
    return sum(t.speed * sizes.get(t.accelerator, 0) for t in types)


def shrink(stage: StageTarget) -> Sizes:
    """Remove instances, the most expensive per unit of work first (types that miss
    the SLO before all), while the capacity stays at the target and above the minimum."""
    sizes = dict(stage.current)
    order = sorted(stage.types, key=lambda t: (t.fits_slo, -t.cost_per_work))
    for t in order:
        while sizes.get(t.accelerator, 0) > 0 and sum(sizes.values()) > stage.minimum:
            left = capacity(stage.types, sizes) - t.speed
            if left < stage.target - _EPS and t.fits_slo:
                break
            if left <= _EPS:  # the stage keeps something to run on
                break
            sizes[t.accelerator] -= 1
    return {a: n for a, n in sizes.items() if n}


def allocate(
    stages: Mapping[str, StageTarget],
    budget_gpus: int,
    counts: Mapping[str, int | None],
) -> Moves:
    """Per stage the instances per type: stages over target shrink, types that miss
    the SLO are swapped for types that meet it where those have room, then stages short
    of their target grow bottleneck first within the budget, the counts and the maxima."""
    moves = Moves()
    for s, st in stages.items():
        over = capacity(st.types, st.current) > st.target + _EPS
        moves.sizes[s] = shrink(st) if over else {a: n for a, n in st.current.items() if n}
    used: dict[str, int] = {}
    for s, sizes in moves.sizes.items():
        for t in stages[s].types:
            used[t.accelerator] = used.get(t.accelerator, 0) + t.gpus * sizes.get(t.accelerator, 0)
    room = Room(budget_gpus, counts, used)
    for s, st in stages.items():
        _swap_misses(st, moves.sizes[s], room)
    short = {s for s, st in stages.items() if _short(st, moves.sizes[s])}
    while short:
        s = min(short, key=lambda x: _share(stages[x], moves.sizes[x]))
        st, sizes = stages[s], moves.sizes[s]
        if sum(sizes.values()) >= st.maximum:
            moves.limited[s] = "max"
            short.discard(s)
            continue
        pick = _cheapest(st, sizes, room, misses_too=True)
        if pick is None:
            moves.limited[s] = "budget"
            short.discard(s)
            continue
        room.add(sizes, pick, 1)
        if not _short(st, sizes):
            short.discard(s)
    return moves


@dataclass
class Room:
    """GPUs in use per type, against the budget and the types' counts."""

    budget_gpus: int
    counts: Mapping[str, int | None]
    used: dict[str, int]

    def fits(self, t: PoolType) -> bool:
        limit = self.counts.get(t.accelerator)
        if sum(self.used.values()) + t.gpus > self.budget_gpus:
            return False
        return limit is None or self.used.get(t.accelerator, 0) + t.gpus <= limit

    def add(self, sizes: Sizes, t: PoolType, n: int) -> None:
        sizes[t.accelerator] = sizes.get(t.accelerator, 0) + n
        if not sizes[t.accelerator]:
            del sizes[t.accelerator]
        self.used[t.accelerator] = self.used.get(t.accelerator, 0) + n * t.gpus


def _swap_misses(stage: StageTarget, sizes: Sizes, room: Room) -> None:
    """Replace instances of types that miss the SLO (the mix moved) by as much capacity
    on types that meet it, one at a time while those have room."""
    goal = capacity(stage.types, sizes)
    for t in stage.types:
        while not t.fits_slo and sizes.get(t.accelerator, 0) > 0:
            trial, trial_room = dict(sizes), Room(room.budget_gpus, room.counts, dict(room.used))
            trial_room.add(trial, t, -1)
            while capacity(stage.types, trial) < goal - _EPS:
                pick = _cheapest(stage, trial, trial_room, misses_too=False)
                if pick is None:
                    return  # no room to replace it: keep what serves
                trial_room.add(trial, pick, 1)
            sizes.clear()
            sizes.update(trial)
            room.used = trial_room.used


def _short(stage: StageTarget, sizes: Mapping[str, int]) -> bool:
    n = sum(sizes.values())
    return n < stage.minimum or capacity(stage.types, sizes) < stage.target - _EPS


def _share(stage: StageTarget, sizes: Mapping[str, int]) -> float:
    if sum(sizes.values()) < stage.minimum:
        return -math.inf  # a stage below its minimum first
    return capacity(stage.types, sizes) / max(stage.target, _EPS)


def _cheapest(
    stage: StageTarget, sizes: Mapping[str, int], room: Room, misses_too: bool
) -> PoolType | None:
    """The type to add: the cheapest per unit of work among those that meet the SLO and
    have room (budget, count, the stage's max for the type); `misses_too`: when none
    has, the fastest of those that miss it (capacity serves more than a queue does)."""

    def open_(t: PoolType) -> bool:
        most = stage.type_max.get(t.accelerator)
        return room.fits(t) and (most is None or sizes.get(t.accelerator, 0) < most)

    fitting = sorted(
        (t for t in stage.types if t.fits_slo and open_(t)),
        key=lambda t: (t.cost_per_work, -t.speed),
    )
    if fitting:
        return fitting[0]
    if not misses_too:
        return None
    rest = [t for t in stage.types if not t.fits_slo and open_(t)]
    return max(rest, key=lambda t: t.speed) if rest else None
