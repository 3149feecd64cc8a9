"""The hybrid scaling policy: a performance model, corrected by runtime feedback (pure).

One decision is a chain of small pure steps (after Ray Serve's
autoscaling_policy.py), each a function of data below:

1. hold (`hold_reason`): disabled, stale or missing metrics hold the size.
2. model: the profile predicts seconds per request for the observed shape
   mix. The arrival rate is forecast (forecast.py) over the lead time a new
   pod needs that the SLO cannot absorb by queueing (`lead_and_horizon`).
   Rate and service time give the pool size whose mean queueing wait
   (Erlang C) fits the stage's share of the SLO slack (`queueing_slack`),
   capped at the target utilization, a little lower while a ramp is
   forecast (`utilization_cap`). That is `predicted`.
3. feedback, the scale factor: the observed/predicted service-time ratio
   (smoothed, `next_ratios`) rescales the model; a backlog beyond the
   expected queue adds pods to drain it (`stage_need`); SLO misses shrink
   the wait budget and meeting it relaxes it again (`next_wait_scale`).
4. bounds (`bounded`): the per-stage minimum and maximum.
5. budget (`share_budget`): when the wishes exceed the GPU budget, the
   budget goes where it raises end-to-end throughput most (max-min over the
   stages), which moves instances between stages; those moves apply at once.
6. delays (`stabilize`): a tolerance band, stabilization windows per
   direction (up: the lowest recommendation in the window, down: the
   highest, `recent_recommendations`), a maximum step, and never below what
   carries the load measured now. Starting pods count as capacity on the way.
7. budget again (`trim_to_budget`): holding some stages may leave the sum
   over budget; the growth is trimmed.

The constants below were tuned with `disagfusion simulate` on the builtin
traces (seed 0) and checked on other seeds (README, "Scheduling").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from disagfusion.scheduling.budget import NO_BUDGET, grow, max_min
from disagfusion.scheduling.capacity import servers_for
from disagfusion.scheduling.forecast import RatePoints, forecast, rate_history
from disagfusion.scheduling.planner import mean_service_times, slo_slack, split_wait
from disagfusion.scheduling.profile import Profile, RequestShape
from disagfusion.scheduling.scaling import (
    Decision,
    Knobs,
    PolicyBase,
    Snapshot,
    StageDecision,
    StageObservation,
    accelerators_of,
    mix_or_default,
    queued_for,
)
from disagfusion.scheduling.stages import STAGES

WAIT_SHARE = 0.2  # share of the SLO slack the mean queueing wait may use
RATIO_SMOOTHING = 0.3  # weight of the newest observed/predicted service-time ratio
RATIO_BOUNDS = (0.2, 5.0)
SLO_TARGET = 0.99
RAMP_HEADROOM = 0.9  # utilization cap multiplier while a ramp is forecast
Mix = tuple[tuple[RequestShape, float], ...]
Recommendations = Mapping[str, tuple[tuple[float, int], ...]]  # stage -> (time, wanted)


@dataclass(frozen=True)
class HybridState:
    ratios: Mapping[str, float] = field(default_factory=dict)  # observed / predicted time
    rates: RatePoints = ()  # (time, arrival rate) for the trend
    recommendations: Recommendations = field(default_factory=dict)
    wait_scale: float = 1.0  # < 1 after SLO misses: a tighter wait budget


@dataclass(frozen=True)
class Outlook:
    """This round's load, the same for every stage's need."""

    rate: float  # arrivals/s measured now
    rate_ahead: float  # arrivals/s forecast for when a pod started now serves
    lead_s: float  # seconds until a pod started now serves
    utilization_cap: float  # the most busy share a stage is sized for
    drain_s: float  # a backlog is drained within max(drain_s, lead_s)


@dataclass(frozen=True)
class Need:
    """What one stage needs this round, before bounds, budget and delays."""

    predicted: int  # model only
    wanted: int  # model scaled by feedback, plus backlog
    service_time_s: float
    why: str


class HybridPolicy(PolicyBase):
    name = "hybrid"

    def initial_state(self) -> HybridState:
        return HybridState()

    def decide(
        self, snapshot: Snapshot, state: HybridState, profile: Profile, knobs: Knobs
    ) -> Decision:
        accs = accelerators_of(snapshot, profile)
        held = hold_reason(snapshot, knobs)
        if held is not None:
            return _hold(snapshot, state, accs, *held)
        budget = knobs.max_gpus or profile.default_gpus
        now, rate = snapshot.now, max(0.0, snapshot.arrival_rps or 0.0)
        mix = mix_or_default(snapshot, profile)
        rates = rate_history(state.rates, now, rate)
        wait_scale = next_wait_scale(state.wait_scale, snapshot.slo_attainment)
        slack = queueing_slack(profile, knobs, mix, accs)
        times = mean_service_times(profile, accs, mix)
        waits = split_wait(times, WAIT_SHARE * wait_scale * slack)
        lead, horizon = lead_and_horizon(profile, knobs, slack)
        rate_ahead, ramp = forecast(rates, now, horizon)
        cap = utilization_cap(knobs.target_utilization, ramp)
        outlook = Outlook(rate, rate_ahead, lead, cap, knobs.drain_seconds)
        ratios = next_ratios(state.ratios, snapshot, times)
        needs = {
            s: stage_need(queued_for(snapshot, s), times[s], ratios[s], waits[s], outlook)
            for s in STAGES
        }
        wanted, limited = bounded({s: needs[s].wanted for s in STAGES}, knobs, budget)
        gpus = {s: profile.gpus_per_instance(s, accs[s]) for s in STAGES}
        over_budget = budget is not None and sum(wanted[s] * gpus[s] for s in STAGES) > budget
        if over_budget and budget is not None:
            balanced = share_budget(wanted, needs, gpus, accs, profile, knobs, budget)
            limited.update({s: "budget" for s in STAGES if balanced[s] < wanted[s]})
            wanted = balanced
        recs = recent_recommendations(state.recommendations, wanted, now, knobs)
        sized = {
            s: stabilize(snapshot.stages[s], needs[s], recs[s], rate, knobs, over_budget)
            for s in STAGES
        }
        if budget is not None:
            current = {s: snapshot.stages[s].desired for s in STAGES}
            sized = trim_to_budget(sized, current, gpus, accs, budget)
        out = {
            s: StageDecision(
                replicas=sized[s][0],
                accelerator=accs[s],
                predicted=needs[s].predicted,
                reason=sized[s][1],
                limited=limited.get(s, ""),
            )
            for s in STAGES
        }
        new_state = HybridState(
            ratios=ratios, rates=rates, recommendations=recs, wait_scale=wait_scale
        )
        throughput = min(out[s].replicas / max(needs[s].service_time_s, 1e-9) for s in STAGES)
        return Decision(stages=out, state=new_state, predicted_throughput_rps=throughput)


def hold_reason(snapshot: Snapshot, knobs: Knobs) -> tuple[str, bool] | None:
    """(why the sizes hold, whether the metrics are fine), or None: decide."""
    if knobs.mode == "Disabled":
        return "autoscaling disabled", True
    age = snapshot.metrics_age_s
    if age is None or snapshot.arrival_rps is None:
        return "no metrics: holding", False
    if age > knobs.stale_after_s:
        return f"metrics {age:.0f}s old: holding", False
    missing = [s for s in STAGES if s not in snapshot.stages]
    if missing:
        return f"no metrics for {', '.join(missing)}: holding", False
    return None


def _hold(
    snapshot: Snapshot, state: HybridState, accs: Mapping[str, str], why: str, ok: bool
) -> Decision:
    stages = {}
    for s in STAGES:
        obs = snapshot.stages.get(s)
        n = obs.desired if obs is not None else 0
        stages[s] = StageDecision(
            replicas=n, accelerator=accs[s], predicted=n, reason=f"{why} at {n}"
        )
    return Decision(stages=stages, state=state, metrics_ok=ok)


def queueing_slack(profile: Profile, knobs: Knobs, mix: Mix, accs: Mapping[str, str]) -> float:
    """Seconds a typical request may spend queueing in all and still meet the SLO."""
    slack, unloaded = slo_slack(profile, accs, mix, profile.slo_or_default(knobs.slo))
    return max(slack, 0.05 * unloaded)


def next_wait_scale(previous: float, attainment: float | None) -> float:
    """SLO feedback: misses tighten the wait budget, meeting the SLO relaxes it."""
    if attainment is None:
        return previous
    if attainment < SLO_TARGET:
        return max(0.1, previous * 0.7)
    return min(1.0, previous * 1.1)


def lead_and_horizon(profile: Profile, knobs: Knobs, slack: float) -> tuple[float, float]:
    """(seconds until a pod started now serves, seconds to forecast ahead).

    New pods serve after start-up; look that far ahead, less what the SLO
    lets the queue absorb meanwhile (a 10-minute video SLO needs no forecast).
    """
    lead = profile.startup_seconds + knobs.interval_s
    if knobs.forecast_seconds is not None:
        return lead, knobs.forecast_seconds
    return lead, max(0.0, lead - (1 - WAIT_SHARE) * slack)


def utilization_cap(target: float, ramp: float) -> float:
    """While a ramp is under way the forecast is least sure: keep more headroom."""
    return target * (RAMP_HEADROOM if ramp > 0 else 1.0)


def next_ratios(
    previous: Mapping[str, float], snapshot: Snapshot, predicted: Mapping[str, float]
) -> dict[str, float]:
    """The smoothed observed/predicted service-time ratio per stage (the scale factor)."""
    ratios = dict(previous)
    for s in STAGES:
        observed = snapshot.stages[s].service_time_s
        ratios[s] = _next_ratio(ratios.get(s, 1.0), observed, predicted[s])
    return ratios


def _next_ratio(previous: float, observed: float | None, predicted: float) -> float:
    if observed is None or observed <= 0 or predicted <= 0:
        return previous
    raw = min(max(observed / predicted, RATIO_BOUNDS[0]), RATIO_BOUNDS[1])
    return previous + RATIO_SMOOTHING * (raw - previous)


def stage_need(
    queued: float, predicted_t: float, ratio: float, wait: float, outlook: Outlook
) -> Need:
    """The model's pool for the forecast, rescaled by feedback, plus pods to drain a backlog."""
    ahead, cap = outlook.rate_ahead, outlook.utilization_cap
    predicted = servers_for(ahead, predicted_t, wait, max_utilization=cap)
    t = predicted_t * ratio
    model = servers_for(ahead, t, wait, max_utilization=cap)
    why = f"{ahead:.3g} req/s x {t:.3g}s"
    if abs(ratio - 1) >= 0.05:
        why += f" (observed/predicted {ratio:.2f})"
    expected_queue = outlook.rate * wait
    backlog = queued - expected_queue
    extra = 0
    if backlog > 1:
        extra = math.ceil(backlog * t / max(outlook.drain_s, outlook.lead_s))
        why += f", backlog {queued:.0f} +{extra}"
    return Need(predicted=predicted, wanted=model + extra, service_time_s=t, why=why)


def bounded(
    needs: Mapping[str, int], knobs: Knobs, budget: int | None
) -> tuple[dict[str, int], dict[str, str]]:
    """(each stage's need within its min and max, {stage: "max"} where the max capped it)."""
    wanted = {
        s: min(max(n, knobs.min_for(s)), knobs.max_for(s, budget or NO_BUDGET))
        for s, n in needs.items()
    }
    return wanted, {s: "max" for s, n in needs.items() if n > wanted[s]}


def share_budget(
    wanted: Mapping[str, int],
    needs: Mapping[str, Need],
    gpus: Mapping[str, int],
    accs: Mapping[str, str],
    profile: Profile,
    knobs: Knobs,
    budget: int,
) -> dict[str, int]:
    """Wishes over the budget: the sizes (at most the wishes) with the most throughput."""
    return max_min(
        capacity_rps={s: 1.0 / max(needs[s].service_time_s, 1e-9) for s in STAGES},
        gpus_per_instance=gpus,
        accelerators=accs,
        budget_gpus=budget,
        minimum={s: knobs.min_for(s) for s in STAGES},
        ceiling={s: min(knobs.max_for(s, budget), wanted[s]) for s in STAGES},
        accelerator_counts=profile.accelerator_counts(),
    )


def recent_recommendations(
    previous: Recommendations, wanted: Mapping[str, int], now: float, knobs: Knobs
) -> dict[str, tuple[tuple[float, int], ...]]:
    """Per stage, the wishes the stabilization windows still see, this one last."""
    kept = max(knobs.scale_down_window_s, knobs.scale_up_window_s)
    return {
        s: (*((t, n) for t, n in previous.get(s, ()) if now - t < kept), (now, wanted[s]))
        for s in STAGES
    }


def stabilize(
    obs: StageObservation,
    need: Need,
    recs: tuple[tuple[float, int], ...],
    rate: float,
    knobs: Knobs,
    rebalancing: bool,
) -> tuple[int, str]:
    """(the size to ask for, why): this round's wish, the last of `recs`, through the
    delays that stop flapping."""
    current = obs.desired  # includes starting pods: capacity already on the way
    wanted = recs[-1][1]
    if wanted == current:
        return current, f"steady at {current}: {need.why}"
    if wanted > current:
        return _scale_up(current, need, recs, knobs)
    if rebalancing:  # the budget is full: moving pods to the bottleneck applies at once
        return wanted, f"down {current}->{wanted}: budget moved to the bottleneck ({need.why})"
    return _scale_down(obs, need, recs, rate, knobs)


def _scale_up(
    current: int, need: Need, recs: tuple[tuple[float, int], ...], knobs: Knobs
) -> tuple[int, str]:
    now, wanted = recs[-1]
    window = [n for t, n in recs if now - t <= knobs.scale_up_window_s]
    target = min(window) if window else wanted
    if current:  # from nothing (first start) the whole size at once
        target = min(target, current + max(knobs.max_step_up, current))
    if target <= current:
        return current, f"holding {current}: scale-up window ({need.why})"
    if current and (target - current) / current <= knobs.tolerance:
        return current, f"holding {current}: within tolerance ({need.why})"
    return target, f"up {current}->{target}: {need.why}"


def _scale_down(
    obs: StageObservation,
    need: Need,
    recs: tuple[tuple[float, int], ...],
    rate: float,
    knobs: Knobs,
) -> tuple[int, str]:
    (now, wanted), current = recs[-1], obs.desired
    window = [n for t, n in recs if now - t <= knobs.scale_down_window_s]
    target = max(window) if window else wanted
    if knobs.max_step_down:
        target = max(target, current - knobs.max_step_down)
    if target >= current:
        return current, f"holding {current}: scale-down window ({need.why})"
    if (current - target) / current <= knobs.tolerance:
        return current, f"holding {current}: within tolerance ({need.why})"
    carrying = math.ceil(rate * need.service_time_s / knobs.target_utilization)
    if target < carrying:  # never below what carries the load measured now
        target = carrying
        if target >= current:
            return (
                current,
                f"holding {current}: fewer would run over {knobs.target_utilization:.0%}",
            )
    if (obs.queue_depth or 0) > target:
        return current, f"holding {current}: {obs.queue_depth:.0f} queued"
    return target, f"down {current}->{target}: {need.why}"


def trim_to_budget(
    sized: Mapping[str, tuple[int, str]],
    current: Mapping[str, int],
    gpus: Mapping[str, int],
    accs: Mapping[str, str],
    budget: int,
) -> dict[str, tuple[int, str]]:
    """Holding some stages may leave the sum over budget: trim the growth, last stage first.

    Shrinks stay; the growth kept is the longest run in stage order that fits.
    """
    kept = grow(
        start={s: min(n, current[s]) for s, (n, _) in sized.items()},
        ceiling={s: n for s, (n, _) in sized.items()},
        gpus_per_instance=gpus,
        accelerators=accs,
        budget_gpus=budget,
        stop_at_first_misfit=True,
    )
    return {
        s: (n, why) if kept[s] == n else (kept[s], f"{why}; trimmed to {kept[s]} by the GPU budget")
        for s, (n, why) in sized.items()
    }
