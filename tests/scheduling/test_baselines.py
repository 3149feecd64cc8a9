"""Baseline policies, one rule a test, on hand-built snapshots (no simulation)."""

from __future__ import annotations

import pytest

from disagfusion.scheduling.baselines import (
    HpaPolicy,
    Load,
    ThresholdPolicy,
    make_policy,
    static_disagg,
    static_monolithic,
)
from disagfusion.scheduling.builtin_profiles import builtin_profile
from disagfusion.scheduling.planner import plan_for_rate
from disagfusion.scheduling.scaling import Knobs, Snapshot, StageObservation
from disagfusion.scheduling.stages import MONOLITHIC, STAGES

QWEN = builtin_profile("qwen-image-h100")
MIXED = builtin_profile("qwen-image-h100-l40s")
KNOBS = Knobs(max_gpus=64)


def snap(
    now: float,
    sizes: dict[str, int],
    busy: dict[str, float],
    queue: dict[str, float] | None = None,
    waiting: float = 0.0,
    starting: dict[str, int] | None = None,
) -> Snapshot:
    stages = {
        s: StageObservation(
            ready=sizes[s],
            starting=(starting or {}).get(s, 0),
            desired=sizes[s] + (starting or {}).get(s, 0),
            queue_depth=(queue or {}).get(s, 0.0),
            busy=busy[s],
        )
        for s in STAGES
    }
    return Snapshot(now=now, stages=stages, arrival_rps=1.0, waiting=waiting)


SIZES = {"encoder": 2, "denoiser": 20, "decoder": 2}


def test_threshold_scales_out_the_stage_with_the_highest_queue_score() -> None:
    policy = ThresholdPolicy()
    busy = {"encoder": 0.3, "denoiser": 19.5, "decoder": 0.5}
    d = policy.decide(snap(100, SIZES, busy, queue={"denoiser": 6}), {}, QWEN, KNOBS)
    # the idle encoder (15 %) shrinks, the decoder (25 %) stays
    assert d.replicas() == {"encoder": 1, "denoiser": 21, "decoder": 2}
    assert d.state["denoiser"] == 100
    # the gateway's waiting requests are the encoder's queue: 5 per ready encoder wins
    d = policy.decide(snap(100, SIZES, busy, queue={"denoiser": 6}, waiting=10), {}, QWEN, KNOBS)
    assert d.replicas()["encoder"] == 3


def test_threshold_waits_out_its_cooldown_and_keeps_busy_stages() -> None:
    policy = ThresholdPolicy()
    busy = {"encoder": 1.8, "denoiser": 19.5, "decoder": 1.8}
    state = {"denoiser": 90.0, "encoder": 0.0, "decoder": 0.0}
    d = policy.decide(snap(100, SIZES, busy, queue={"denoiser": 6}), state, QWEN, KNOBS)
    assert d.replicas()["denoiser"] == 20  # cooling down since t = 90
    assert d.replicas()["encoder"] == 3  # the next highest score is not
    d = policy.decide(snap(121, SIZES, busy, queue={"denoiser": 6}), state, QWEN, KNOBS)
    assert d.replicas()["denoiser"] == 21


def test_threshold_scales_in_only_idle_stages_with_empty_queues() -> None:
    policy = ThresholdPolicy()
    busy = {"encoder": 0.2, "denoiser": 3.0, "decoder": 0.2}
    d = policy.decide(snap(100, SIZES, busy, queue={"encoder": 0}), {}, QWEN, KNOBS)
    assert d.replicas() == {"encoder": 1, "denoiser": 19, "decoder": 1}
    d = policy.decide(snap(100, SIZES, busy, waiting=1), {}, QWEN, KNOBS)
    assert d.replicas()["encoder"] == 2  # a request waits for it
    one = dict.fromkeys(STAGES, 1)
    d = policy.decide(snap(100, one, dict.fromkeys(STAGES, 0.0)), {}, QWEN, KNOBS)
    assert d.replicas() == one  # never below the minimum


def test_threshold_keeps_the_budget() -> None:
    busy = {"encoder": 2.0, "denoiser": 20.0, "decoder": 2.0}
    d = ThresholdPolicy().decide(
        snap(100, SIZES, busy, queue={"denoiser": 9}), {}, QWEN, Knobs(max_gpus=24)
    )
    assert d.replicas() == SIZES


def test_hpa_recommendation_follows_the_v2_formula() -> None:
    hpa = HpaPolicy()
    assert hpa.recommend(current=10, ready=10, busy=10.0) == 15  # ceil(10 x 1.0 / 0.7)
    assert hpa.recommend(current=10, ready=10, busy=7.5) == 10  # ratio 1.07: within 0.1
    assert hpa.recommend(current=10, ready=10, busy=3.0) == 5
    # starting pods count as idle: 4 ready busy + 4 starting is enough for a 0.7 target
    assert hpa.recommend(current=8, ready=4, busy=4.0) == 8
    assert hpa.recommend(current=10, ready=0, busy=None) == 10


def test_hpa_scale_up_is_capped_at_double_or_four_pods() -> None:
    hpa = HpaPolicy()
    sizes = {"encoder": 1, "denoiser": 20, "decoder": 1}
    busy = {"encoder": 0.7, "denoiser": 20.0, "decoder": 0.7}
    s = snap(0, sizes, busy)
    # desired 3, but 20 ready and busy (an outside scale-down): at most max(2 x 3, 3 + 4)
    stages = dict(s.stages)
    stages["denoiser"] = StageObservation(ready=20, starting=0, desired=3, busy=20.0)
    s = Snapshot(now=0, stages=stages, arrival_rps=1.0)
    d = hpa.decide(s, {}, QWEN, KNOBS)
    assert d.replicas()["denoiser"] == 7
    assert d.replicas()["encoder"] == 1


def test_hpa_scale_down_waits_for_the_stabilization_window() -> None:
    hpa = HpaPolicy()
    state = {"denoiser": ((0.0, 20),)}
    low = {"encoder": 1.4, "denoiser": 7.0, "decoder": 1.4}  # 35 %: 10 would do
    d = hpa.decide(snap(200, SIZES, low), state, QWEN, KNOBS)
    assert d.replicas()["denoiser"] == 20  # 20 was recommended 200 s ago
    assert d.state["denoiser"] == ((0.0, 20), (200, 10))  # raw recommendations are kept
    d = hpa.decide(snap(299, SIZES, low), d.state, QWEN, KNOBS)
    assert d.replicas()["denoiser"] == 20
    d = hpa.decide(snap(301, SIZES, low), d.state, QWEN, KNOBS)
    assert d.replicas()["denoiser"] == 10


def test_static_disagg_is_the_planners_pool_for_the_mean_load() -> None:
    mix = ((QWEN.default_request, 1.0),)
    policy = static_disagg(QWEN, Load(1.0, mix), 64, "2x")
    plan = plan_for_rate(QWEN, 1.0, mix, "2x")
    assert {s: n for s, (n, _) in policy.sizes.items()} == {
        s: p.replicas for s, p in plan.stages.items()
    }
    clipped = static_disagg(QWEN, Load(100.0, mix), 64, "2x")  # needs far more than 64
    assert sum(n for n, _ in clipped.sizes.values()) <= 64


def test_static_monolithic_holds_every_model_on_each_replica() -> None:
    assert QWEN.gpus_per_instance(MONOLITHIC, "H100") == 1  # 57.8 GB on 80 GB
    assert MIXED.gpus_per_instance(MONOLITHIC, "L40S") == 2  # on 48 GB
    assert MIXED.default_accelerator(MONOLITHIC) == "H100"  # the first that runs every stage
    mix = ((QWEN.default_request, 1.0),)
    policy = static_monolithic(QWEN, Load(1.0, mix), 64, "2x")
    ((n, acc),) = policy.sizes.values()
    assert acc == "H100" and policy.monolithic
    assert 26 * 1.0 / 0.8 <= n <= 64  # ~26 s per request at <= 80 % utilization
    big = static_monolithic(MIXED, Load(100.0, mix), 64, "2x")
    assert next(iter(big.sizes.values()))[0] == 32  # only 32 H100 in the pool


def test_make_policy_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known: static-monolithic"):
        make_policy("magic", QWEN, [], 64, "2x")
    assert make_policy("hybrid", QWEN, [], 64, "2x").name == "hybrid"
