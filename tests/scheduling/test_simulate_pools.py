"""The simulator with heterogeneous pools: per-type sizes and speed-aware dispatch."""

from __future__ import annotations

from typing import Any

import pytest

from disagfusion.scheduling.baselines import make_policy
from disagfusion.scheduling.builtin_profiles import builtin_profile
from disagfusion.scheduling.profile import Profile, RequestShape, parse_profile
from disagfusion.scheduling.scaling import (
    Decision,
    Knobs,
    PolicyBase,
    Snapshot,
    StageDecision,
)
from disagfusion.scheduling.sim.simulate import SimConfig, SimResult, SimulationError, simulate
from disagfusion.scheduling.stages import STAGES
from disagfusion.scheduling.traces import TraceRequest, builtin_trace

SHAPE = RequestShape(64, 64, 1, 1)
HOP = 0.5


def two_types() -> Profile:
    """F: denoiser 10 s at $3/h; S: denoiser 30 s at $1/h; encoder and decoder 1 s on F."""
    cost = {"memory_gb": 10}
    return parse_profile(
        {
            "name": "two-types",
            "accelerators": [
                {"name": "F", "cost_per_hour": 3.0, "memory_gb": 80, "count": 4},
                {"name": "S", "cost_per_hour": 1.0, "memory_gb": 80, "count": 4},
            ],
            "startup_seconds": 0,
            "handoff_seconds": HOP,
            "default_request": {"width": 64, "height": 64, "frames": 1, "steps": 1},
            "defaults": {"gpus": 16, "slo": "2x"},
            "stages": {
                "encoder": {"F": {"a": 1.0, **cost}},
                "denoiser": {"F": {"a": 10.0, **cost}, "S": {"a": 30.0, **cost}},
                "decoder": {"F": {"a": 1.0, **cost}},
            },
        }
    )


class Pools(PolicyBase):
    """Fixed sizes: the denoiser's per type (by time), one encoder and one decoder."""

    name = "pools"
    interval_s = 10.0

    def __init__(self, steps: list[tuple[float, dict[str, int]]]) -> None:
        self.steps = steps
        self.seen: list[Snapshot] = []

    def initial_state(self) -> None:
        return None

    def decide(self, snapshot: Snapshot, state: Any, profile: Profile, knobs: Knobs) -> Decision:
        self.seen.append(snapshot)
        sizes = [p for t, p in self.steps if t <= snapshot.now][-1]
        stages = {
            s: StageDecision(replicas=1, accelerator="F", predicted=1, reason="")
            for s in ("encoder", "decoder")
        }
        stages["denoiser"] = StageDecision(
            replicas=sum(sizes.values()),
            accelerator="F",
            predicted=0,
            reason="",
            pools=tuple(sizes.items()),
        )
        return Decision(stages=stages, state=state)


def run(policy: Any, times: list[float], gpus: int = 16) -> SimResult:
    cfg = SimConfig(gpus=gpus, slo="2x", max_queue=1000, noise_sigma=0.0, record=True)
    return simulate(two_types(), [TraceRequest(t, SHAPE) for t in times], policy, cfg)


def latency(denoise_s: float) -> float:
    return 1.0 + denoise_s + 1.0 + 2 * HOP


def test_a_request_goes_to_the_fast_idle_instance_not_the_slow_one() -> None:
    r = run(Pools([(0.0, {"S": 1, "F": 1})]), [5.0])
    assert r.latencies == [pytest.approx(latency(10.0))]


def test_a_slow_instance_leaves_work_a_busy_fast_one_finishes_first() -> None:
    # The second request reaches the denoiser while F is busy until 16.5: F finishes it
    # at 26.5, S would at 6.6 + 30: it waits for F.
    r = run(Pools([(0.0, {"S": 1, "F": 1})]), [5.0, 5.1])
    assert sorted(r.latencies) == [
        pytest.approx(latency(10.0)),
        pytest.approx(latency(10.0) + 10.0 - 0.1),
    ]


def test_the_slow_instance_takes_work_once_the_queue_outgrows_the_fast_one() -> None:
    # Four at once reach the denoiser at 6.5, 7.5, 8.5, 9.5 (one 1 s encoder). F takes
    # the first (free at 16.5). S would finish the next at 37.5, 38.5, 39.5, by when F
    # finishes two more: S leaves the queue to F until it holds three, then takes its
    # head (the second request, done at 39.5); F serves the third and the fourth.
    r = run(Pools([(0.0, {"S": 1, "F": 1})]), [5.0, 5.0, 5.0, 5.0])
    assert r.completed == 4
    tail = 0.5 + 1.0  # hand-off and decoder after the denoiser
    done = [16.5 + tail, 26.5 + tail, 36.5 + tail, 39.5 + tail]
    assert sorted(r.latencies) == [pytest.approx(t - 5.0) for t in done]


def test_per_type_sizes_hold_gpus_and_cost_per_type() -> None:
    policy = Pools([(0.0, {"F": 2, "S": 3})])
    r = run(policy, [0.0, 100.0])
    held = [sum(c) for _, c in r.timeline]
    assert held[0] == 2 + 2 + 3  # encoder, decoder, 2 F + 3 S denoisers
    hours = r.duration_s / 3600
    assert r.gpu_hours == pytest.approx(7 * hours, rel=1e-6)
    assert r.cost_usd == pytest.approx((4 * 3.0 + 3 * 1.0) * hours, rel=1e-6)
    # the policy sees the pools it asked for
    assert policy.seen[-1].stages["denoiser"].pools == {"F": 2, "S": 3}
    assert policy.seen[-1].stages["denoiser"].desired == 5


def test_the_types_counts_hold_whatever_the_policy_asks() -> None:
    r = run(Pools([(0.0, {"F": 9, "S": 9})]), [0.0])  # 4 of each exist; F also runs 2
    held = [sum(c) for _, c in r.timeline]
    assert max(held) == 4 + 4


def test_a_type_dropped_from_the_pools_drains_and_loses_nothing() -> None:
    steps = [(0.0, {"F": 1, "S": 2}), (10.0, {"F": 1})]
    r = run(Pools(steps), [0.0, 0.0, 0.0])
    assert r.completed == 3 and r.unfinished == 0
    held = [c for _, c in r.timeline]
    assert held[0] == (1, 3, 1)
    assert held[-1] == (1, 1, 1)  # the S pods left once their requests were done


def test_a_pool_on_a_type_the_stage_cannot_run_on_is_an_error() -> None:
    class Bad(Pools):
        def decide(self, *args: Any) -> Decision:
            d = super().decide(*args)
            stages = dict(d.stages)
            stages["encoder"] = StageDecision(
                replicas=2, accelerator="F", predicted=2, reason="", pools=(("S", 2),)
            )
            return Decision(stages=stages, state=None)

    with pytest.raises(SimulationError, match="encoder cannot run on 'S'"):
        run(Bad([(0.0, {"F": 1})]), [0.0])


MIXED = builtin_profile("qwen-image-h100-l40s")


def compare(trace: str, slo: str, load: float) -> dict[str, dict[str, Any]]:
    gpus = MIXED.default_gpus
    assert gpus is not None
    requests = builtin_trace(trace, MIXED, gpus, load=load)
    cfg = SimConfig(gpus=gpus, slo=slo, max_queue=10 * gpus)
    return {
        name: simulate(
            MIXED, requests, make_policy(name, MIXED, requests, gpus, slo), cfg
        ).summary()
        for name in ("hybrid", "hybrid-pools")
    }


def test_pools_carry_a_burst_one_type_per_stage_cannot() -> None:
    # At 1.34x the one-type capacity the bursts need more denoisers than the 32 H100s;
    # a 120 s SLO leaves an L40S denoise (68 s) room to queue.
    out = compare("burst", "120s", 1.34)
    assert out["hybrid"]["slo_attainment"] < 0.95
    assert out["hybrid-pools"]["slo_attainment"] >= 0.99
    assert out["hybrid-pools"]["rejected"] == 0


def test_pools_add_no_l40s_denoiser_the_slo_rules_out() -> None:
    # 60 s: an L40S denoise alone takes 68 s, so the pools are the one-type hybrid's.
    out = compare("steady", "60s", 1.0)
    assert out["hybrid-pools"]["slo_attainment"] == out["hybrid"]["slo_attainment"] == 1.0
    assert out["hybrid-pools"]["cost_usd"] == pytest.approx(out["hybrid"]["cost_usd"], rel=0.01)


def test_on_one_accelerator_type_hybrid_pools_is_the_hybrid() -> None:
    profile = builtin_profile("qwen-image-h100")
    gpus, slo = 64, "60s"
    requests = builtin_trace("burst", profile, gpus)
    cfg = SimConfig(gpus=gpus, slo=slo, max_queue=10 * gpus)
    out = [
        simulate(profile, requests, make_policy(n, profile, requests, gpus, slo), cfg).summary()
        for n in ("hybrid", "hybrid-pools")
    ]
    assert out[0] == out[1]


def test_stages_of_the_toy_profile() -> None:
    assert two_types().options("denoiser") == ("F", "S")
    assert all(two_types().options(s) == ("F",) for s in STAGES if s != "denoiser")
