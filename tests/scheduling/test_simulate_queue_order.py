"""The simulator's queue order (fifo, edf) and batching, on hand-checked toys and the
mixed light/heavy trace."""

from __future__ import annotations

from typing import Any

import pytest

from disagfusion.scheduling.baselines import StaticPolicy, make_policy
from disagfusion.scheduling.builtin_profiles import builtin_profile
from disagfusion.scheduling.profile import Profile, RequestShape, parse_profile
from disagfusion.scheduling.sim.simulate import SimConfig, SimResult, simulate
from disagfusion.scheduling.traces import (
    BUILTIN_TRACE_SLOS,
    TraceRequest,
    builtin_trace,
    small_light_shape,
)

HEAVY = RequestShape(1000, 1000, 1, 10)  # P = 1: the denoiser takes `steps` seconds
LIGHT = RequestShape(1000, 1000, 1, 1)


def toy(denoiser_batch: dict[str, float] | None = None) -> Profile:
    """Encoder and decoder 1 s; denoiser 1 s per step at P = 1; 0.5 s per hand-off."""
    den: dict[str, Any] = {"c": 1.0, "memory_gb": 10}
    if denoiser_batch:
        den["batch"] = denoiser_batch
    return parse_profile(
        {
            "name": "toy",
            "accelerators": [{"name": "G", "cost_per_hour": 1.0, "memory_gb": 80}],
            "handoff_seconds": 0.5,
            "default_request": {"width": 1000, "height": 1000, "frames": 1, "steps": 1},
            "stages": {
                "encoder": {"G": {"a": 1.0, "memory_gb": 10}},
                "denoiser": {"G": den},
                "decoder": {"G": {"a": 1.0, "memory_gb": 10}},
            },
        }
    )


def static(encoder: int = 1, denoiser: int = 1, decoder: int = 1) -> StaticPolicy:
    sizes = {"encoder": (encoder, "G"), "denoiser": (denoiser, "G"), "decoder": (decoder, "G")}
    return StaticPolicy("static", sizes)


def run(profile: Profile, requests: list[TraceRequest], policy: Any, **cfg: Any) -> SimResult:
    config = SimConfig(**{"gpus": 64, "slo": "3x", "max_queue": 1000, "noise_sigma": 0.0, **cfg})
    return simulate(profile, requests, policy, config)


def two_heavies_and_a_light() -> list[TraceRequest]:
    return [TraceRequest(0.0, HEAVY), TraceRequest(0.1, HEAVY), TraceRequest(0.2, LIGHT)]


def test_fifo_serves_each_stage_in_arrival_order() -> None:
    r = run(toy(), two_heavies_and_a_light(), static(), queue_order="fifo")
    # encoder 0-1, 1-2, 2-3; denoiser 1.5-11.5, 11.5-21.5 (heavy 2), 21.5-22.5 (light);
    # decoder 12-13, 22-23, 23-24
    assert r.latencies == pytest.approx([13.0, 22.9, 23.8])


def test_edf_lets_the_light_request_overtake_at_the_denoiser() -> None:
    r = run(toy(), two_heavies_and_a_light(), static(), queue_order="edf")
    # deadlines (3x): heavy 2 at 0.1 + 3 x 13 = 39.1, light at 0.2 + 3 x 4 = 12.2:
    # the light one takes the denoiser at 11.5 (to 12.5), heavy 2 from 12.5 to 22.5
    assert r.latencies == pytest.approx([13.0, 13.8, 23.9])


def test_the_default_config_is_fifo_without_batching() -> None:
    requests = builtin_trace("burst", QWEN, gpus=8, requests=300)
    policy = make_policy("hpa", QWEN, requests, 8, "2x")
    base = SimConfig(gpus=8, slo="2x", max_queue=80, seed=2)
    explicit = SimConfig(gpus=8, slo="2x", max_queue=80, seed=2, queue_order="fifo", max_batch=1)
    per_stage = SimConfig(
        gpus=8, slo="2x", max_queue=80, seed=2, max_batch={"denoiser": 1, "decoder": 1}
    )
    a, b, c = (simulate(QWEN, requests, policy, cfg) for cfg in (base, explicit, per_stage))
    assert a.summary() == b.summary() == c.summary()
    assert a.latencies == b.latencies == c.latencies


def test_a_batch_serves_queued_requests_of_one_shape_in_one_call() -> None:
    profile = toy({"4": 2.0})  # four requests in twice the time of one
    requests = [TraceRequest(0.0, LIGHT) for _ in range(5)]
    r = run(profile, requests, static(encoder=5), max_batch={"denoiser": 4})
    # all five reach the denoiser at 1.5: the first starts alone (nothing waits for a
    # batch to fill), the other four go together at 2.5 for 2 s; the decoder (batch 1)
    # serves them one by one from 5.0
    assert r.latencies == pytest.approx([4.0, 6.0, 7.0, 8.0, 9.0])
    unbatched = run(profile, requests, static(encoder=5), max_batch=1)
    assert unbatched.latencies == pytest.approx([4.0, 5.0, 6.0, 7.0, 8.0])
    # one limit for every stage: the decoder, with no batch term, takes the last three
    # in one call of 3 x 1 s
    everywhere = run(profile, requests, static(encoder=5), max_batch=4)
    assert everywhere.latencies == pytest.approx([4.0, 6.0, 9.0, 9.0, 9.0])


def test_a_batch_never_mixes_shapes() -> None:
    profile = toy({"2": 1.0})  # a pair costs one request's time
    requests = [TraceRequest(0.0, LIGHT), TraceRequest(0.0, HEAVY), TraceRequest(0.0, LIGHT)]
    r = run(profile, requests, static(encoder=3), max_batch=2)
    # denoiser: light 1 alone 1.5-2.5; then the heavy (the head) alone, 2.5-12.5, though
    # a light waits behind it: a batch holds one shape
    assert r.latencies == pytest.approx([4.0, 14.0, 15.0])


def test_batching_with_a_batch_term_raises_throughput_under_overload() -> None:
    profile = toy({"8": 1.6})  # eight in 1.6 s: 5 req/s
    requests = [TraceRequest(i * 0.25, LIGHT) for i in range(400)]  # 4 req/s, 1 s each
    pools = static(encoder=8, denoiser=1, decoder=8)
    one = run(profile, requests, pools, max_batch=1, max_queue=50)
    eight = run(profile, requests, pools, max_batch=8, max_queue=50)
    assert one.rejected > 200  # one denoiser serves 1 req/s
    assert eight.rejected == 0 and eight.completed == 400
    assert eight.summary()["throughput_rps"] > 2.5 * one.summary()["throughput_rps"]


def test_max_batch_is_checked() -> None:
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1, got 0"):
        SimConfig(gpus=8, slo="2x", max_queue=8, max_batch=0)
    with pytest.raises(ValueError, match="unknown stage"):
        SimConfig(gpus=8, slo="2x", max_queue=8, max_batch={"vae": 2})
    with pytest.raises(ValueError, match="unknown queue order 'lifo'"):
        run(toy(), two_heavies_and_a_light(), static(), queue_order="lifo")


QWEN = builtin_profile("qwen-image-h100")


def test_the_mixed_trace_is_mostly_light_and_meant_for_a_slowdown_slo() -> None:
    trace = builtin_trace("mixed-light-heavy", QWEN, gpus=16, requests=2000)
    light = small_light_shape(QWEN.default_request)
    shapes = [r.shape for r in trace]
    assert set(shapes) == {light, QWEN.default_request}
    assert 0.8 < shapes.count(light) / len(shapes) < 0.9
    assert BUILTIN_TRACE_SLOS["mixed-light-heavy"] == "3x"
    assert builtin_trace("mixed-light-heavy", QWEN, gpus=16, requests=2000) == trace


@pytest.mark.parametrize("policy", ["static-disagg", "hybrid"])
def test_edf_beats_fifo_on_the_mixed_trace(policy: str) -> None:
    # At a fixed size the order decides; hybrid adds the headroom short requests
    # need, so there EDF must meet the SLO and be no worse than FIFO.
    trace = builtin_trace("mixed-light-heavy", QWEN, gpus=16, requests=6000)
    out = {}
    for order in ("fifo", "edf"):
        cfg = SimConfig(gpus=16, slo="3x", max_queue=160, seed=1, queue_order=order)
        out[order] = simulate(QWEN, trace, make_policy(policy, QWEN, trace, 16, "3x"), cfg)
    fifo, edf = out["fifo"].summary(), out["edf"].summary()
    if policy == "static-disagg":
        assert edf["slo_attainment"] > fifo["slo_attainment"] + 0.01, (fifo, edf)
    else:
        assert edf["slo_attainment"] >= max(fifo["slo_attainment"], 0.99), (fifo, edf)
    assert edf["completed"] + edf["rejected"] == len(trace)
