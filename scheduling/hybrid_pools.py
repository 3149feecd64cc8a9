"""The hybrid policy over heterogeneous pools: one stage on several accelerator types (pure).

The hybrid policy (hybrid.py) sizes each stage in instances of one type. Here
every stage is counted in instances of its fastest type (the reference): an
instance of a slower type is worth t_ref / t_type of one, over the recent mix.
The hybrid chain runs unchanged on that view of the cluster (its model,
feedback, forecast and stabilization windows, with no budget: the budget is in
GPUs, and a reference instance's GPUs depend on which pool provides it), and
says how much reference capacity each stage should have. pool_moves.py then
turns that into instances per type: grow the type cheapest per unit of work that
still meets the SLO, shrink the most expensive first, within each type's count
and the GPU budget, bottleneck first. A stage whose hybrid size holds keeps its
pools as they are: pools only move when the stage does. A profile whose stages
each run on one type only is left to the hybrid policy itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from disagfusion.scheduling.budget import NO_BUDGET
from disagfusion.scheduling.hybrid import HybridPolicy, HybridState, hold_reason
from disagfusion.scheduling.pool_moves import PoolType, StageTarget, allocate, capacity
from disagfusion.scheduling.pools import StageOption, mean_time, stage_options
from disagfusion.scheduling.pools_rate import wait_budgets
from disagfusion.scheduling.profile import Profile, RequestShape
from disagfusion.scheduling.scaling import (
    Decision,
    Knobs,
    PolicyBase,
    Snapshot,
    StageDecision,
    mix_or_default,
)
from disagfusion.scheduling.short_requests import SLO_TARGET, Mix
from disagfusion.scheduling.stages import STAGES

MIN_SLACK_SHARE = 0.5  # a slower type's path keeps half the main type's room to queue


class HybridPoolsPolicy(PolicyBase):
    name = "hybrid-pools"

    def __init__(self) -> None:
        self.inner = HybridPolicy()

    def initial_state(self) -> HybridState:
        return self.inner.initial_state()

    def decide(
        self, snapshot: Snapshot, state: HybridState, profile: Profile, knobs: Knobs
    ) -> Decision:
        if all(len(profile.options(s)) == 1 for s in STAGES):
            return self.inner.decide(snapshot, state, profile, knobs)  # nothing to mix
        current = current_pools(snapshot, profile)
        held = hold_reason(snapshot, knobs)
        if held is not None:
            return _hold(current, state, profile, *held)
        mix = mix_or_default(snapshot, profile)
        types = pool_types(profile, mix, profile.slo_or_default(knobs.slo), current)
        view = reference_snapshot(snapshot, types, current)
        inner_knobs = replace(knobs, max_gpus=NO_BUDGET, max_replicas={})
        decided = self.inner.decide(view, state, _uncounted(profile), inner_knobs)
        targets = {}
        for s in STAGES:
            wanted = decided.stages[s].replicas
            held_size = view.stages[s].desired
            # The hybrid holds this stage: so do its pools (what they are worth now).
            target = capacity(types[s], current[s]) if wanted == held_size else float(wanted)
            targets[s] = StageTarget(
                types=types[s],
                current=current[s],
                target=target,
                minimum=knobs.min_for(s),
                maximum=knobs.max_replicas.get(s, 10**9),
                type_max=knobs.max_pool_replicas.get(s, {}),
            )
        budget = knobs.max_gpus or profile.default_gpus or NO_BUDGET
        moves = allocate(targets, budget, profile.accelerator_counts())
        out = {
            s: _stage_decision(
                s, moves.sizes[s], decided.stages[s], moves.limited.get(s, ""), profile, types[s]
            )
            for s in STAGES
        }
        throughput = min(
            sum(_rate(profile, s, a, mix) * n for a, n in moves.sizes[s].items()) for s in STAGES
        )
        return Decision(stages=out, state=decided.state, predicted_throughput_rps=throughput)


def current_pools(snapshot: Snapshot, profile: Profile) -> dict[str, dict[str, int]]:
    """Instances asked for per stage and type (a stage without metrics: none)."""
    out = {}
    for s in STAGES:
        obs = snapshot.stages.get(s)
        sizes = obs.pool_sizes(profile.default_accelerator(s)) if obs is not None else {}
        out[s] = {a: n for a, n in sizes.items() if n}
    return out


def pool_types(
    profile: Profile, mix: Mix, slo: str, current: Mapping[str, Mapping[str, int]]
) -> dict[str, tuple[PoolType, ...]]:
    """Per stage every type it may run on: its worth in instances of the stage's
    reference type (`reference`) over the mix, and whether requests there still meet
    the SLO (`fits_slo`)."""
    options = stage_options(profile, mix)
    fastest = {s: min(opts, key=lambda o: o.seconds) for s, opts in options.items()}
    out = {}
    for s, opts in options.items():
        fits = {o.accelerator: fits_slo(profile, mix, slo, fastest, s, o) for o in opts}
        ref = reference(opts, current[s], fits)
        out[s] = tuple(
            PoolType(
                accelerator=o.accelerator,
                speed=ref.seconds / o.seconds if o.seconds > 0 else 1.0,
                gpus=o.gpus,
                price=profile.accelerator(o.accelerator).cost_per_hour,
                fits_slo=fits[o.accelerator],
                slower=o.seconds > fastest[s].seconds * (1 + 1e-9),
            )
            for o in opts
        )
    return out


def reference(
    options: list[StageOption], sizes: Mapping[str, int], fits: Mapping[str, bool]
) -> StageOption:
    """The type the hybrid chain counts a stage in: of the types that meet the SLO, the
    one with the most instances (so a one-type stage is sized exactly as the hybrid
    policy sizes it), else the fastest (the chain's SLO slack is that type's)."""
    held = [o for o in options if sizes.get(o.accelerator) and fits.get(o.accelerator)]
    if held:
        return max(held, key=lambda o: sizes[o.accelerator])  # first on ties
    return min(options, key=lambda o: o.seconds)


def fits_slo(
    profile: Profile,
    mix: Mix,
    slo: str,
    fastest: Mapping[str, StageOption],
    stage: str,
    option: StageOption,
) -> bool:
    """Whether requests served by `option` still meet the SLO: for every shape of the mix
    but a share within the SLO target's misses, the path through it (the other stages
    on their fastest types) leaves at least MIN_SLACK_SHARE of the queueing room the
    all-fastest path leaves (a mean over a light and heavy mix would hide that the
    heavy ones always miss; a path with almost no room misses once anything queues)."""
    base = {s: [fastest[s]] for s in STAGES}
    sets = {**base, stage: [option]}
    total = sum(w for _, w in mix) or 1.0
    missed = 0.0
    for shape, w in mix:
        one = ((shape, 1.0),)
        try:
            here = sum(wait_budgets(profile, one, slo, _on_shape(profile, sets, shape)).values())
            usual = sum(wait_budgets(profile, one, slo, _on_shape(profile, base, shape)).values())
        except ValueError:  # no room to queue on this type's path (or on any)
            missed += w / total
            continue
        if here < MIN_SLACK_SHARE * usual:
            missed += w / total
    return missed <= 1 - SLO_TARGET


def _on_shape(
    profile: Profile, sets: Mapping[str, list[StageOption]], shape: RequestShape
) -> dict[str, list[StageOption]]:
    """The options re-timed for one shape (wait_budgets picks the slowest by seconds)."""
    return {
        s: [replace(o, seconds=profile.service_time(s, o.accelerator, shape)) for o in opts]
        for s, opts in sets.items()
    }


def reference_snapshot(
    snapshot: Snapshot,
    types: Mapping[str, tuple[PoolType, ...]],
    current: Mapping[str, Mapping[str, int]],
) -> Snapshot:
    """The snapshot in fastest-type instances: a stage of 10 H100 and 8 L40S at 0.37
    reads as 12 H100 (rounded down: never more capacity than there is). The
    reference of a stage is the type its instances are counted in (speed 1)."""
    stages = {}
    for s, obs in snapshot.stages.items():
        ref = next(t.accelerator for t in types[s] if t.speed == 1.0)
        held = sum(current[s].values())
        worth = capacity(types[s], current[s])
        scale = worth / held if held else 1.0  # reference instances per instance

        def scaled(x: float | None, factor: float = scale) -> float | None:
            return None if x is None else x * factor

        stages[s] = replace(
            obs,
            ready=math.floor(obs.ready * scale + 1e-6),
            starting=math.floor(obs.starting * scale + 1e-6),
            desired=math.floor(worth + 1e-6),
            accelerator=ref,
            busy=scaled(obs.busy),
            # Instance-seconds per request on the mixed pool, as on reference instances.
            service_time_s=scaled(obs.service_time_s),
            pools={},
        )
    return replace(snapshot, stages=stages)


def _uncounted(profile: Profile) -> Profile:
    """The profile without per-type counts: the inner policy plans reference capacity."""
    accs = tuple(replace(a, count=None) for a in profile.accelerators)
    return replace(profile, accelerators=accs, default_gpus=None)


def _rate(profile: Profile, stage: str, acc: str, mix: Mix) -> float:
    """Requests/s one instance of `stage` on `acc` completes over the mix, batch 1
    (inf for a stage that costs nothing)."""
    seconds = mean_time(profile, stage, acc, mix)
    return 1.0 / seconds if seconds > 0 else math.inf


def _stage_decision(
    stage: str,
    sizes: Mapping[str, int],
    inner: StageDecision,
    limited: str,
    profile: Profile,
    types: tuple[PoolType, ...],
) -> StageDecision:
    order = [t.accelerator for t in types]
    pools = tuple((a, sizes[a]) for a in order if sizes.get(a))
    total = sum(n for _, n in pools)
    main = max(pools, key=lambda p: p[1])[0] if pools else profile.default_accelerator(stage)
    text = " + ".join(f"{n} {a}" for a, n in pools) or "none"
    return StageDecision(
        replicas=total,
        accelerator=main,
        predicted=inner.predicted,
        reason=f"{inner.reason}; pools {text}",
        limited=limited or inner.limited,
        pools=pools,
    )


def _hold(
    current: Mapping[str, Mapping[str, int]],
    state: HybridState,
    profile: Profile,
    why: str,
    ok: bool,
) -> Decision:
    stages = {}
    for s in STAGES:
        sizes = dict(current[s])
        n = sum(sizes.values())
        main = max(sizes, key=lambda a: sizes[a]) if sizes else profile.default_accelerator(s)
        stages[s] = StageDecision(
            replicas=n,
            accelerator=main,
            predicted=n,
            reason=f"{why} at {n}",
            pools=tuple(sizes.items()),
        )
    return Decision(stages=stages, state=state, metrics_ok=ok)
