"""Per-pool decisions: pool_moves.py (pure rules) and the hybrid-pools policy."""

from __future__ import annotations

import pytest

from disagfusion.scheduling.builtin_profiles import builtin_profile
from disagfusion.scheduling.hybrid_pools import HybridPoolsPolicy, pool_types
from disagfusion.scheduling.pool_moves import PoolType, StageTarget, allocate, capacity, shrink
from disagfusion.scheduling.scaling import Decision, Knobs, Snapshot, StageObservation

FAST = PoolType("H100", speed=1.0, gpus=1, price=2.5, fits_slo=True)
SLOW = PoolType("L40S", speed=0.5, gpus=1, price=0.9, fits_slo=True, slower=True)
SLOW_MISS = PoolType("L40S", speed=0.5, gpus=1, price=0.9, fits_slo=False, slower=True)


def test_growth_takes_the_cheapest_type_per_unit_of_work_that_fits() -> None:
    # L40S: 0.9 / 0.5 = 1.8 per unit (x1.1 for being slower) < H100 2.5
    st = StageTarget(types=(FAST, SLOW), current={"H100": 1}, target=3.0)
    moves = allocate({"encoder": st}, budget_gpus=100, counts={"H100": 10, "L40S": 10})
    assert moves.sizes["encoder"] == {"H100": 1, "L40S": 4}
    assert capacity(st.types, moves.sizes["encoder"]) == pytest.approx(3.0)


def test_a_type_that_misses_the_slo_is_the_last_resort() -> None:
    st = StageTarget(types=(FAST, SLOW_MISS), current={"H100": 1}, target=3.0)
    moves = allocate({"denoiser": st}, budget_gpus=100, counts={"H100": 10, "L40S": 10})
    assert moves.sizes["denoiser"] == {"H100": 3}
    full = allocate({"denoiser": st}, budget_gpus=100, counts={"H100": 2, "L40S": 10})
    assert full.sizes["denoiser"] == {"H100": 2, "L40S": 2}  # capacity beats a queue
    capped = StageTarget(st.types, st.current, st.target, type_max={"H100": 2, "L40S": 1})
    none = allocate({"denoiser": capped}, budget_gpus=100, counts={"H100": 10, "L40S": 10})
    assert none.sizes["denoiser"] == {"H100": 2, "L40S": 1}
    assert none.limited == {"denoiser": "budget"}


def test_shrink_removes_the_most_expensive_per_unit_of_work_first() -> None:
    st = StageTarget(types=(FAST, SLOW), current={"H100": 2, "L40S": 2}, target=2.0)
    assert shrink(st) == {"L40S": 2, "H100": 1}  # an H100 (2.5) before an L40S (1.98)


def test_a_type_that_stopped_meeting_the_slo_is_replaced_at_the_same_size() -> None:
    st = StageTarget(types=(FAST, SLOW_MISS), current={"H100": 1, "L40S": 2}, target=2.0)
    moves = allocate({"denoiser": st}, budget_gpus=100, counts={"H100": 10, "L40S": 10})
    assert moves.sizes["denoiser"] == {"H100": 2}


def test_the_budget_goes_to_the_bottleneck_first() -> None:
    a = StageTarget(types=(FAST,), current={"H100": 1}, target=4.0)
    b = StageTarget(types=(FAST,), current={"H100": 3}, target=4.0)
    moves = allocate({"encoder": a, "denoiser": b}, budget_gpus=6, counts={"H100": None})
    assert moves.sizes == {"encoder": {"H100": 3}, "denoiser": {"H100": 3}}
    assert moves.limited == {"encoder": "budget", "denoiser": "budget"}


def test_a_stage_keeps_its_minimum_and_never_exceeds_its_maximum() -> None:
    low = StageTarget(types=(FAST, SLOW), current={"H100": 3}, target=0.0, minimum=1)
    assert shrink(low) == {"H100": 1}
    high = StageTarget(types=(FAST,), current={"H100": 1}, target=9.0, maximum=2)
    moves = allocate({"decoder": high}, budget_gpus=100, counts={"H100": None})
    assert moves.sizes["decoder"] == {"H100": 2} and moves.limited == {"decoder": "max"}


MIXED = builtin_profile("qwen-image-h100-l40s")  # 32 H100 + 32 L40S


def snapshot(rate: float, denoiser: dict[str, int]) -> Snapshot:
    """A steady cluster at `rate` with the default request; the denoiser as given."""
    shape = MIXED.default_request

    def obs(stage: str, pools: dict[str, int]) -> StageObservation:
        n = sum(pools.values())
        t = MIXED.service_time(stage, next(iter(pools)), shape)
        return StageObservation(
            ready=n,
            starting=0,
            desired=n,
            accelerator=max(pools, key=lambda a: pools[a]),
            queue_depth=0.0,
            in_flight=rate * t,
            busy=rate * t,
            service_time_s=t,
            throughput_rps=rate,
            pools=pools,
        )

    return Snapshot(
        now=0.0,
        stages={
            "encoder": obs("encoder", {"L40S": 2}),
            "denoiser": obs("denoiser", denoiser),
            "decoder": obs("decoder", {"L40S": 2}),
        },
        arrival_rps=rate,
        mix=((shape, 1.0),),
        waiting=0.0,
        slo_attainment=1.0,
    )


def decide(rate: float, denoiser: dict[str, int], slo: str) -> Decision:
    policy = HybridPoolsPolicy()
    knobs = Knobs(slo=slo, max_gpus=64)
    return policy.decide(snapshot(rate, denoiser), policy.initial_state(), MIXED, knobs)


def test_past_the_h100_count_the_denoiser_grows_on_l40s_when_the_slo_allows() -> None:
    d = decide(1.6, {"H100": 32}, "120s").stages["denoiser"]
    sizes = d.pool_sizes()
    assert sizes["H100"] == 32 and sizes["L40S"] > 0
    assert d.replicas == sum(sizes.values())
    assert "L40S" in d.reason
    used = {"H100": 0, "L40S": 0}
    for stage in decide(1.6, {"H100": 32}, "120s").stages.values():
        for acc, n in stage.pool_sizes().items():
            used[acc] += n
    assert used["H100"] <= 32 and used["L40S"] <= 32 and sum(used.values()) <= 64


def test_an_slo_an_l40s_denoise_cannot_meet_takes_l40s_only_past_the_h100s() -> None:
    d = decide(1.0, {"H100": 20}, "60s").stages["denoiser"]
    assert set(d.pool_sizes()) == {"H100"} and d.replicas > 20
    past = decide(1.6, {"H100": 32}, "60s").stages["denoiser"].pool_sizes()
    assert past["H100"] == 32 and past["L40S"] > 0  # served late beats queued


def test_l40s_that_miss_the_slo_are_swapped_for_h100_with_room() -> None:
    d = decide(1.0, {"H100": 20, "L40S": 8}, "60s").stages["denoiser"].pool_sizes()
    assert d.get("L40S", 0) == 0 and d["H100"] <= 32


def test_an_idle_pipeline_sheds_the_l40s_denoisers_first() -> None:
    d = decide(0.2, {"H100": 20, "L40S": 10}, "120s").stages["denoiser"]
    sizes = d.pool_sizes()
    assert sizes.get("L40S", 0) < 10 and d.replicas < 30
    assert sizes.get("L40S", 0) == 0 or sizes["H100"] == 20  # L40S go before any H100


def test_which_types_fit_the_slo() -> None:
    mix = ((MIXED.default_request, 1.0),)
    current = {"encoder": {"L40S": 1}, "denoiser": {"H100": 1}, "decoder": {"L40S": 1}}
    at60 = {t.accelerator: t.fits_slo for t in pool_types(MIXED, mix, "60s", current)["denoiser"]}
    at120 = {t.accelerator: t.fits_slo for t in pool_types(MIXED, mix, "120s", current)["denoiser"]}
    assert at60 == {"H100": True, "L40S": False}
    assert at120 == {"H100": True, "L40S": True}


def test_a_stage_that_costs_nothing_does_not_break_the_decision() -> None:
    from disagfusion.scheduling.profile import parse_profile

    free = {"a": 0.0, "memory_gb": 1}
    profile = parse_profile(
        {
            "name": "free-encoder",
            "accelerators": [
                {"name": "F", "cost_per_hour": 1.0, "memory_gb": 80},
                {"name": "S", "cost_per_hour": 0.5, "memory_gb": 80},
            ],
            "default_request": {"width": 64, "height": 64, "frames": 1, "steps": 1},
            "defaults": {"gpus": 8, "slo": "60s"},
            "stages": {
                "encoder": {"F": free, "S": free},
                "denoiser": {"F": {"a": 1.0, "memory_gb": 1}, "S": {"a": 2.0, "memory_gb": 1}},
                "decoder": {"F": {"a": 0.1, "memory_gb": 1}},
            },
        }
    )
    one = StageObservation(ready=1, starting=0, desired=1, queue_depth=0.0, pools={"F": 1})
    snap = Snapshot(
        now=1.0,
        stages=dict.fromkeys(("encoder", "denoiser", "decoder"), one),
        arrival_rps=2.0,
        metrics_age_s=0.0,
    )
    policy = HybridPoolsPolicy()
    d = policy.decide(snap, policy.initial_state(), profile, Knobs(max_gpus=8))
    assert d.stages["denoiser"].replicas >= 2  # 2 req/s at 1 s each
    assert d.predicted_throughput_rps is not None and d.predicted_throughput_rps >= 2.0
