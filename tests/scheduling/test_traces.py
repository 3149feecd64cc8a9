"""Trace files and the builtin traces (relative to a profile and a GPU budget)."""

from __future__ import annotations

import itertools

import pytest

from disagfusion.scheduling.builtin_profiles import builtin_profile
from disagfusion.scheduling.planner import plan_for_gpus
from disagfusion.scheduling.profile import RequestShape
from disagfusion.scheduling.traces import (
    BUILTIN_TRACES,
    BURST_RAMP_S,
    TraceError,
    TraceRequest,
    builtin_trace,
    light_shape,
    parse_trace_lines,
    shape_mix,
    trace_to_lines,
)

QWEN = builtin_profile("qwen-image-h100")
WAN = builtin_profile("wan2.1-14b-t2v-h100")


def rate_between(trace: list[TraceRequest], t0: float, t1: float) -> float:
    return sum(t0 <= r.t < t1 for r in trace) / (t1 - t0)


def test_lines_round_trip_and_fill_defaults() -> None:
    default = RequestShape(512, 512, 1, 20)
    trace = parse_trace_lines(['{"t": 0}', "", '{"t": 1.5, "steps": 4, "frames": 9}'], default)
    assert trace == [
        TraceRequest(0.0, default),
        TraceRequest(1.5, RequestShape(512, 512, 9, 4)),
    ]
    assert parse_trace_lines(list(trace_to_lines(trace)), RequestShape()) == trace
    assert shape_mix(trace) == ((default, 0.5), (RequestShape(512, 512, 9, 4), 0.5))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{nope", "line 2: not JSON"),
        ("[1]", "line 2: must be a JSON object"),
        ('{"t": -1}', "line 2: 't'"),
        ('{"t": 5, "steps": 0}', "line 2: 'steps'"),
        ('{"t": 5, "prompt": "x"}', "line 2: unknown field(s) prompt"),
    ],
)
def test_bad_lines_are_named(line: str, message: str) -> None:
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_trace_lines(['{"t": 1}', line], RequestShape())


def test_lines_must_be_in_time_order() -> None:
    with pytest.raises(TraceError, match=r"line 2: t=0\.5 is before"):
        parse_trace_lines(['{"t": 1}', '{"t": 0.5}'], RequestShape())


def test_builtin_traces_are_seeded_and_stay_small() -> None:
    for profile in (QWEN, WAN, builtin_profile("qwen-image-h100-l40s")):
        for name in BUILTIN_TRACES:
            trace = builtin_trace(name, profile)
            assert 500 < len(trace) < 200_000, (profile.name, name, len(trace))
            assert all(a.t <= b.t for a, b in itertools.pairwise(trace))
    assert builtin_trace("burst", QWEN, seed=1) == builtin_trace("burst", QWEN, seed=1)
    assert builtin_trace("burst", QWEN, seed=1) != builtin_trace("burst", QWEN, seed=2)


def test_steady_runs_at_sixty_percent_of_the_budgets_capacity() -> None:
    for gpus in (16, 64):
        capacity = plan_for_gpus(QWEN, gpus).throughput_rps
        trace = builtin_trace("steady", QWEN, gpus=gpus)
        assert rate_between(trace, 0, 7200) == pytest.approx(0.6 * capacity, rel=0.05)
        assert {r.shape for r in trace} == {QWEN.default_request}


def test_burst_and_diurnal_follow_their_shapes() -> None:
    capacity = plan_for_gpus(QWEN, 64).throughput_rps
    burst = builtin_trace("burst", QWEN)
    assert rate_between(burst, 0, 3000) == pytest.approx(0.35 * capacity, rel=0.1)
    assert rate_between(burst, 3700, 4400) == pytest.approx(0.8 * capacity, rel=0.1)
    ramp = rate_between(burst, 3600 - BURST_RAMP_S, 3600)  # the ramp up: 0.35x -> 0.8x
    assert ramp == pytest.approx(0.575 * capacity, rel=0.15)
    diurnal = builtin_trace("diurnal", QWEN)
    assert rate_between(diurnal, 0, 1800) == pytest.approx(0.15 * capacity, rel=0.15)
    assert rate_between(diurnal, 42300, 44100) == pytest.approx(0.7 * capacity, rel=0.1)


def test_mix_shift_moves_from_light_to_heavy_at_constant_work() -> None:
    light = light_shape(WAN.default_request)
    assert light == RequestShape(832, 480, 1, 8)
    trace = builtin_trace("mix-shift", WAN)
    first = [r for r in trace if r.t < 1800]
    last = [r for r in trace if r.t >= 4 * 3600 - 1800]
    assert sum(r.shape == light for r in first) / len(first) > 0.75
    assert sum(r.shape == WAN.default_request for r in last) / len(last) > 0.75
    # the rate falls as requests get heavier, so the offered work stays near 0.55x
    for part, t0 in ((first, 0), (last, 4 * 3600 - 1800)):
        capacity = plan_for_gpus(WAN, 96, shape_mix(part)).throughput_rps
        assert rate_between(part, t0, t0 + 1800) == pytest.approx(0.55 * capacity, rel=0.15)


def test_requests_rescales_the_rate_and_unknown_names_fail() -> None:
    trace = builtin_trace("diurnal", QWEN, gpus=4, requests=3000)
    assert len(trace) == pytest.approx(3000, rel=0.1)
    assert trace[-1].t > 23 * 3600  # the same day, just denser or sparser
    with pytest.raises(KeyError, match="known: steady, burst, diurnal, mix-shift"):
        builtin_trace("nope", QWEN)
