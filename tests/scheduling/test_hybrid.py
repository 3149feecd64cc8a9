"""The hybrid policy, one rule a test, with injected time (no clock, no I/O)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from disagfusion.scheduling.builtin_profiles import builtin_profile
from disagfusion.scheduling.capacity import servers_for
from disagfusion.scheduling.forecast import forecast
from disagfusion.scheduling.hybrid import (
    RAMP_HEADROOM,
    RATIO_BOUNDS,
    WAIT_SHARE,
    HybridPolicy,
    HybridState,
    Need,
    Outlook,
    bounded,
    hold_reason,
    lead_and_horizon,
    next_ratios,
    next_times,
    stabilize,
    stage_need,
    trim_to_budget,
    utilization_cap,
)
from disagfusion.scheduling.profile import STAGES, Profile, RequestShape
from disagfusion.scheduling.scaling import Decision, Knobs, Snapshot, StageObservation
from disagfusion.scheduling.short_requests import (
    NO_TAIL,
    TAIL_MISS_SHARE,
    service_cv2,
    short_shape,
    tail_rules,
)

QWEN = builtin_profile("qwen-image-h100")  # encoder 0.26 s, denoiser 25.3 s, decoder 0.31 s
POLICY = HybridPolicy()
FAST = Knobs(max_gpus=1000, scale_down_window_s=0.0, max_step_up=10_000)


def snap(
    now: float,
    sizes: dict[str, int],
    rate: float | None,
    profile: Profile = QWEN,
    queue: dict[str, float] | None = None,
    observed: dict[str, float] | None = None,
    starting: dict[str, int] | None = None,
    age: float | None = 0.0,
    mix: tuple[tuple[RequestShape, float], ...] = (),
    attainment: float | None = None,
) -> Snapshot:
    stages = {}
    for s in STAGES:
        n = sizes[s]
        up = (starting or {}).get(s, 0)
        stages[s] = StageObservation(
            ready=n - up,
            starting=up,
            desired=n,
            queue_depth=(queue or {}).get(s, 0.0),
            service_time_s=(observed or {}).get(
                s, profile.service_time(s, "H100", profile.default_request)
            ),
        )
    return Snapshot(
        now=now,
        stages=stages,
        arrival_rps=rate,
        mix=mix,
        metrics_age_s=age,
        slo_attainment=attainment,
    )


def run(snapshots: list[Snapshot], knobs: Knobs = FAST, profile: Profile = QWEN) -> list[Decision]:
    state: HybridState = POLICY.initial_state()
    out = []
    for s in snapshots:
        d = POLICY.decide(s, state, profile, knobs)
        state = d.state
        out.append(d)
    return out


ONES = {"encoder": 1, "denoiser": 1, "decoder": 1}


def test_balance_follows_each_stages_work() -> None:
    (d,) = run([snap(0, ONES, rate=2.0)])
    r = d.replicas()
    # 2 req/s x 25.3 s = 50.6 busy denoisers, at most 90 % busy; light stages need 1-2.
    assert r["denoiser"] >= servers_for(2.0, 25.3, 1e9, 0.9) == 57
    assert r["denoiser"] <= 60
    assert 1 <= r["encoder"] <= 3 and 1 <= r["decoder"] <= 3
    assert d.stages["denoiser"].predicted == r["denoiser"]
    assert "req/s" in d.stages["denoiser"].reason and d.metrics_ok


def test_step_counts_in_the_mix_move_the_ratio() -> None:
    light = ((RequestShape(1328, 1328, 1, 4), 1.0),)
    heavy = ((RequestShape(1328, 1328, 1, 50), 1.0),)
    (a,) = run([snap(0, ONES, rate=2.0, mix=light)])
    (b,) = run([snap(0, ONES, rate=2.0, mix=heavy)])
    # 12.5x the denoising work: far more denoisers, about the same encoders.
    assert b.replicas()["denoiser"] >= 4 * a.replicas()["denoiser"]
    assert b.replicas()["encoder"] <= a.replicas()["encoder"] + 1


def test_observed_slowness_corrects_the_model() -> None:
    slow = {"denoiser": 50.6}  # twice the profile's 25.3 s
    decisions = run([snap(15 * i, ONES, rate=1.0, observed=slow) for i in range(12)])
    first, last = decisions[0].stages["denoiser"], decisions[-1].stages["denoiser"]
    assert first.predicted == last.predicted  # the model alone does not see it
    assert last.replicas >= 1.9 * last.predicted
    assert "observed/predicted" in last.reason


def test_backlog_adds_pods_to_drain_it() -> None:
    calm, busy = (
        run([snap(0, ONES, rate=0.5)]),
        run([snap(0, ONES, rate=0.5, queue={"denoiser": 200})]),
    )
    assert busy[0].replicas()["denoiser"] > calm[0].replicas()["denoiser"] + 20
    assert "backlog" in busy[0].stages["denoiser"].reason


def test_gateway_waiting_counts_as_encoder_backlog() -> None:
    base = snap(0, ONES, rate=1.0)
    (d,) = run([replace(base, waiting=500.0)])
    assert d.replicas()["encoder"] > run([base])[0].replicas()["encoder"]


def test_budget_goes_to_the_bottleneck() -> None:
    (d,) = run([snap(0, ONES, rate=5.0)], knobs=replace(FAST, max_gpus=40))
    r = d.replicas()
    assert sum(r.values()) <= 40
    assert r["denoiser"] >= 37 and r["encoder"] >= 1 and r["decoder"] >= 1
    assert d.stages["denoiser"].limited == "budget"


def test_full_budget_moves_instances_between_stages() -> None:
    # 12 encoders idle while the denoisers are the bottleneck: move them now.
    sizes = {"encoder": 12, "denoiser": 26, "decoder": 2}
    knobs = replace(FAST, max_gpus=40, scale_down_window_s=300.0)
    (d,) = run([snap(0, sizes, rate=3.0)], knobs=knobs)
    r = d.replicas()
    assert r["encoder"] < 12 and r["denoiser"] > 26
    assert sum(r.values()) <= 40
    assert "budget" in d.stages["encoder"].reason


def test_scale_down_waits_for_the_window_then_goes() -> None:
    knobs = replace(FAST, scale_down_window_s=300.0)
    big = {"encoder": 2, "denoiser": 66, "decoder": 2}
    # Load drops at t=0 from what needed 66 denoisers to a third of it.
    ds = run([snap(0, big, rate=2.4)] + [snap(t, big, rate=0.6) for t in range(15, 400, 15)], knobs)
    during = [d for d, t in zip(ds, range(0, 400, 15), strict=False) if t < 300]
    assert all(d.replicas()["denoiser"] == 66 for d in during)
    assert "window" in during[-1].stages["denoiser"].reason
    assert ds[-1].replicas()["denoiser"] < 30


def test_tolerance_ignores_small_changes() -> None:
    sizes = {"encoder": 2, "denoiser": 60, "decoder": 2}
    (d,) = run([snap(0, sizes, rate=2.0)])  # wants 57: within 10 % of 60
    assert d.replicas()["denoiser"] == 60
    assert "tolerance" in d.stages["denoiser"].reason


def test_scale_up_is_limited_per_decision() -> None:
    sizes = {"encoder": 1, "denoiser": 4, "decoder": 1}
    (d,) = run([snap(0, sizes, rate=2.0)], knobs=replace(FAST, max_step_up=4))
    assert d.replicas()["denoiser"] == 8  # +100 % (more than +4)


def test_starting_pods_count_as_capacity_on_the_way() -> None:
    (first,) = run([snap(0, ONES, rate=2.0)])
    n = first.replicas()["denoiser"]
    sizes = {**first.replicas()}
    starting = {"denoiser": n - 1}  # asked for, still pulling images
    (again,) = run([snap(15, sizes, rate=2.0, starting=starting)])
    assert again.replicas()["denoiser"] == n


def test_scale_down_only_when_the_rest_carry_the_load() -> None:
    sizes = {"encoder": 2, "denoiser": 66, "decoder": 2}
    knobs = replace(FAST, tolerance=0.0)
    (d,) = run([snap(0, sizes, rate=0.5, queue={"denoiser": 70})], knobs)
    assert d.replicas()["denoiser"] == 66
    assert "queued" in d.stages["denoiser"].reason


@pytest.mark.parametrize("age", [None, 500.0])
def test_stale_or_missing_metrics_hold_the_size(age: float | None) -> None:
    sizes = {"encoder": 3, "denoiser": 20, "decoder": 2}
    (d,) = run([snap(0, sizes, rate=0.0, age=age)])
    assert d.replicas() == sizes and not d.metrics_ok
    assert "holding" in d.stages["denoiser"].reason


def test_unknown_arrival_rate_holds_rather_than_scaling_to_zero() -> None:
    sizes = {"encoder": 3, "denoiser": 20, "decoder": 2}
    (d,) = run([snap(0, sizes, rate=None)])
    assert d.replicas() == sizes and not d.metrics_ok


def test_idle_pipeline_shrinks_to_min_not_zero() -> None:
    sizes = {"encoder": 3, "denoiser": 20, "decoder": 2}
    ds = run([snap(t, sizes, rate=0.0) for t in (0, 15, 30)])
    assert ds[-1].replicas() == ONES
    zero_ok = replace(FAST, min_replicas={"denoiser": 0})
    (d,) = run([snap(0, sizes, rate=0.0)], zero_ok)
    assert d.replicas()["denoiser"] == 0


def test_rising_rate_is_forecast_over_the_startup_time() -> None:
    flat = run([snap(t, ONES, rate=1.0) for t in range(0, 300, 15)])
    rising = run([snap(t, ONES, rate=0.5 + t / 600) for t in range(0, 300, 15)])
    # Both end at ~1 req/s now; the rising one sizes for where it will be in ~2 min.
    assert rising[-1].replicas()["denoiser"] > flat[-1].replicas()["denoiser"] * 1.1


def test_slo_misses_tighten_the_wait_budget() -> None:
    ok = run([snap(15 * i, ONES, rate=2.0, attainment=1.0) for i in range(4)])
    missing = run([snap(15 * i, ONES, rate=2.0, attainment=0.9) for i in range(4)])
    assert missing[-1].replicas()["encoder"] >= ok[-1].replicas()["encoder"]
    assert missing[-1].state.wait_scale < ok[-1].state.wait_scale


def test_max_replicas_caps_and_says_so() -> None:
    knobs = replace(FAST, max_replicas={"denoiser": 10})
    (d,) = run([snap(0, ONES, rate=2.0)], knobs)
    assert d.replicas()["denoiser"] == 10 and d.stages["denoiser"].limited == "max"


def test_disabled_mode_does_not_act() -> None:
    sizes = {"encoder": 1, "denoiser": 2, "decoder": 1}
    s = snap(0, sizes, rate=2.0)
    (d,) = run([s])
    assert d.replicas()["denoiser"] > 2
    (off,) = run([s], replace(FAST, mode="Disabled"))
    assert off.replicas() == sizes and "disabled" in off.stages["denoiser"].reason


def test_heterogeneous_budget_respects_accelerator_counts() -> None:
    hetero = builtin_profile("qwen-image-h100-l40s")  # 32 H100 + 32 L40S
    s = snap(0, ONES, rate=5.0, profile=hetero)
    (d,) = run([s], replace(FAST, max_gpus=64), profile=hetero)
    # Every stage defaults to the H100: only 32 of them exist.
    assert sum(d.replicas().values()) <= 32
    assert {x.accelerator for x in d.stages.values()} == {"H100"}


# --- the steps, one at a time -----------------------------------------------------------


def test_hold_reason_names_why_and_whether_metrics_are_fine() -> None:
    fine = snap(0, ONES, rate=1.0)
    assert hold_reason(fine, FAST) is None
    assert hold_reason(fine, replace(FAST, mode="Disabled")) == ("autoscaling disabled", True)
    assert hold_reason(snap(0, ONES, rate=None), FAST) == ("no metrics: holding", False)
    assert hold_reason(snap(0, ONES, rate=1.0, age=500.0), FAST) == (
        "metrics 500s old: holding",
        False,
    )
    partial = replace(fine, stages={"encoder": fine.stages["encoder"]})
    assert hold_reason(partial, FAST) == ("no metrics for denoiser, decoder: holding", False)


def test_forecast_counts_a_rise_only_when_it_clears_the_noise() -> None:
    flat = tuple((float(t), 1.0) for t in range(0, 300, 15))
    assert forecast(flat, 285.0, 120.0) == (pytest.approx(1.0), 0.0)
    rising = tuple((float(t), 0.5 + t / 600) for t in range(0, 300, 15))
    ahead, ramp = forecast(rising, 285.0, 120.0)
    assert ramp > 0 and ahead == pytest.approx(0.975 + 120 / 600, rel=0.05)


def test_lead_and_horizon_look_ahead_only_past_what_the_slo_absorbs() -> None:
    lead, horizon = lead_and_horizon(QWEN, FAST, slack=10.0)
    assert lead == QWEN.startup_seconds + FAST.interval_s
    assert horizon == pytest.approx(lead - 0.8 * 10.0)
    assert lead_and_horizon(QWEN, FAST, slack=1e4)[1] == 0.0  # a long SLO: no forecast
    assert lead_and_horizon(QWEN, replace(FAST, forecast_seconds=30.0), 10.0)[1] == 30.0


def test_utilization_cap_keeps_headroom_while_a_ramp_is_on() -> None:
    assert utilization_cap(0.9, ramp=0.0) == 0.9
    assert utilization_cap(0.9, ramp=0.3) == pytest.approx(0.9 * RAMP_HEADROOM)


def test_next_ratios_smooth_toward_the_observed_time_within_bounds() -> None:
    times = {"encoder": 1.0, "denoiser": 10.0, "decoder": 1.0}
    observed = {"encoder": 1.0, "denoiser": 20.0, "decoder": 100.0}
    s = snap(0, ONES, rate=1.0, observed=observed)
    ratios = next_ratios({}, s, times)
    assert ratios["encoder"] == 1.0
    assert ratios["denoiser"] == pytest.approx(1.0 + 0.3 * (2.0 - 1.0))
    assert ratios["decoder"] == pytest.approx(1.0 + 0.3 * (RATIO_BOUNDS[1] - 1.0))
    unseen = replace(s, stages={k: replace(v, service_time_s=None) for k, v in s.stages.items()})
    assert next_ratios({"denoiser": 1.7}, unseen, times)["denoiser"] == 1.7


def test_stage_need_scales_the_model_by_feedback_and_drains_a_backlog() -> None:
    outlook = Outlook(rate=1.0, rate_ahead=1.0, lead_s=60.0, utilization_cap=0.9, drain_s=60.0)
    plain = stage_need(0.0, 10.0, 1.0, 1e9, outlook)
    assert plain.predicted == plain.wanted == servers_for(1.0, 10.0, 1e9, 0.9) == 12
    slow = stage_need(0.0, 10.0, 2.0, 1e9, outlook)  # observed twice the model's time
    assert slow.predicted == 12 and slow.wanted == servers_for(1.0, 20.0, 1e9, 0.9) == 23
    assert "observed/predicted 2.00" in slow.why
    late = stage_need(61.0, 10.0, 1.0, 1.0, outlook)  # 60 queued beyond the 1 expected
    assert late.wanted == servers_for(1.0, 10.0, 1.0, 0.9) + 10  # 60 x 10 s within 60 s
    assert "backlog 61 +10" in late.why


def test_bounded_applies_min_and_max_and_names_the_cap() -> None:
    knobs = replace(FAST, min_replicas={"encoder": 2}, max_replicas={"denoiser": 10})
    wanted, limited = bounded({"encoder": 0, "denoiser": 50, "decoder": 3}, knobs, budget=100)
    assert wanted == {"encoder": 2, "denoiser": 10, "decoder": 3}
    assert limited == {"denoiser": "max"}
    # no max and no budget: only the NO_BUDGET ceiling
    assert bounded({"denoiser": 5000}, FAST, budget=None)[0] == {"denoiser": 5000}


NEED = Need(predicted=0, wanted=0, service_time_s=10.0, why="model")


def observed(desired: int, queue: float = 0.0) -> StageObservation:
    return StageObservation(ready=desired, starting=0, desired=desired, queue_depth=queue)


def test_stabilize_limits_a_step_up_and_holds_small_changes() -> None:
    knobs = replace(FAST, max_step_up=4)
    assert stabilize(observed(4), NEED, ((0.0, 20),), 0.0, knobs, False)[0] == 8
    assert stabilize(observed(0), NEED, ((0.0, 20),), 0.0, knobs, False)[0] == 20
    n, why = stabilize(observed(60), NEED, ((0.0, 63),), 0.0, knobs, False)
    assert n == 60 and "tolerance" in why


def test_stabilize_scales_down_to_the_windows_highest_unless_rebalancing() -> None:
    knobs = replace(FAST, scale_down_window_s=300.0)
    recs = ((0.0, 30), (100.0, 10))
    n, why = stabilize(observed(30), NEED, recs, 0.0, knobs, False)
    assert n == 30 and "scale-down window" in why
    assert stabilize(observed(30), NEED, recs, 0.0, knobs, True)[0] == 10
    later = ((400.0, 10),)
    assert stabilize(observed(30), NEED, later, 0.0, knobs, False)[0] == 10
    # never below what carries the load now: 1 req/s x 10 s at 90 % busy needs 12
    assert stabilize(observed(30), NEED, later, 1.0, knobs, False)[0] == 12


def test_trim_to_budget_trims_the_last_stages_growth_first() -> None:
    sized = {"encoder": (3, "up"), "denoiser": (12, "up"), "decoder": (1, "down")}
    current = {"encoder": 2, "denoiser": 10, "decoder": 2}
    out = trim_to_budget(
        sized, current, dict.fromkeys(STAGES, 1), dict.fromkeys(STAGES, "H100"), 14
    )
    assert out["encoder"] == (3, "up")
    assert out["denoiser"] == (10, "up; trimmed to 10 by the GPU budget")
    assert out["decoder"] == (1, "down")  # a shrink stays
    fits = trim_to_budget(
        sized, current, dict.fromkeys(STAGES, 1), dict.fromkeys(STAGES, "H100"), 16
    )
    assert fits == sized


# --- short requests under a slowdown SLO (issue #13: the mixed light/heavy trace) -----

WAN = builtin_profile("wan2.1-14b-t2v-h100")  # heavy: denoiser 253 s, decoder 2.4 s
WAN_ACCS = dict.fromkeys(STAGES, "H100")
WAN_LIGHT = RequestShape(416, 240, 1, 8)  # about 1 s through the pipeline
WAN_MIX = ((WAN_LIGHT, 0.85), (WAN.default_request, 0.15))


def test_short_shape_is_the_mixs_fast_end() -> None:
    assert short_shape(WAN, WAN_ACCS, WAN_MIX) == WAN_LIGHT
    # 3 % light is under SHORT_SHARE (5 %): the short requests are the heavy ones.
    rare = ((WAN_LIGHT, 0.03), (WAN.default_request, 0.97))
    assert short_shape(WAN, WAN_ACCS, rare) == WAN.default_request


def test_tail_rules_only_where_short_requests_have_less_slack_than_the_mean() -> None:
    cv2 = service_cv2(WAN, WAN_ACCS, WAN_MIX)
    assert cv2["denoiser"] > 4 and cv2["encoder"] == pytest.approx(0, abs=1e-9)  # alike
    slowdown = tail_rules(WAN, replace(FAST, slo="3x"), WAN_MIX, WAN_ACCS, cv2)
    light = WAN.unloaded_latency(WAN_LIGHT, WAN_ACCS)
    assert slowdown["denoiser"].max_wait_s == pytest.approx((1 - WAIT_SHARE) * 2 * light)
    assert slowdown["denoiser"].length_bias == pytest.approx(1 + cv2["denoiser"])
    assert slowdown["denoiser"].miss_share == TAIL_MISS_SHARE
    seconds = tail_rules(WAN, replace(FAST, slo="600s"), WAN_MIX, WAN_ACCS, cv2)
    assert all(t == NO_TAIL for t in seconds.values())  # short ones have the most slack
    one = ((WAN.default_request, 1.0),)
    alone = tail_rules(WAN, replace(FAST, slo="3x"), one, WAN_ACCS, service_cv2(WAN, WAN_ACCS, one))
    assert all(t == NO_TAIL for t in alone.values())


def test_light_requests_behind_heavy_ones_get_headroom() -> None:
    sizes = {"encoder": 3, "denoiser": 60, "decoder": 2}
    tight = run([snap(0, sizes, 1.34, WAN, mix=WAN_MIX)], replace(FAST, slo="3x"), WAN)[0]
    loose = run([snap(0, sizes, 1.34, WAN, mix=WAN_MIX)], replace(FAST, slo="1000x"), WAN)[0]
    t, lo = tight.replicas(), loose.replicas()
    # 0.2 heavy req/s x 253 s is 51 busy denoisers: a light one finds them all busy
    # far more often than 1 % at the mean-wait size, and then waits seconds.
    assert t["denoiser"] >= lo["denoiser"] + 8
    assert t["decoder"] >= 3 > lo["decoder"]
    assert t == {s: tight.stages[s].predicted for s in STAGES}


def test_next_times_smooth_a_noisy_mix_and_take_one_shape_as_is() -> None:
    before = {s: ("H100", 40.0) for s in STAGES}
    now = dict.fromkeys(STAGES, 50.0)
    noisy = next_times(before, now, WAN_ACCS, dict.fromkeys(STAGES, 5.6), rate=1.3)
    assert 40.0 < noisy["denoiser"] < 41.0  # a dozen heavy ones a minute: barely moves
    exact = next_times(before, now, WAN_ACCS, dict.fromkeys(STAGES, 0.0), rate=1.3)
    assert exact["denoiser"] == 50.0
    moved = next_times(before, now, dict.fromkeys(STAGES, "L40S"), {}, rate=1.3)
    assert moved["denoiser"] == 50.0  # another accelerator: nothing to smooth with
    assert next_times({}, now, WAN_ACCS, dict.fromkeys(STAGES, 5.6), 1.3) == now


def test_next_ratios_move_less_on_a_noisy_observed_mean() -> None:
    times = dict.fromkeys(STAGES, 10.0)
    s = snap(0, ONES, rate=1.0, observed=dict.fromkeys(STAGES, 20.0))
    s = replace(s, stages={k: replace(v, throughput_rps=1.0) for k, v in s.stages.items()})
    calm = next_ratios({}, s, times, dict.fromkeys(STAGES, 0.0))
    noisy = next_ratios({}, s, times, dict.fromkeys(STAGES, 5.6))
    assert calm["denoiser"] == pytest.approx(1.3)
    assert 1.0 < noisy["denoiser"] < 1.05
