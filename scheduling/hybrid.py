"""The hybrid scaling policy: a performance model, corrected by runtime feedback (pure).

One decision, per stage:

1. model: the profile predicts seconds per request for the observed shape mix.
   The arrival rate is a least-squares line through the last ten minutes of
   windowed rates (kept within the Poisson noise of the newest one, so a step
   counts at once) plus its rise, when significant, over the lead time a new
   pod needs that the SLO cannot absorb by queueing. Rate and service time
   give the pool size whose mean queueing wait (Erlang C) fits the stage's
   share of the SLO slack, capped at the target utilization (a little lower
   while a ramp is forecast). That is `predicted`.
2. feedback: the observed/predicted service-time ratio (smoothed) rescales
   the model; a backlog beyond the expected queue adds pods to drain it; SLO
   misses shrink the wait budget, and meeting it relaxes it again.
3. budget: when the wishes exceed the GPU budget, the budget goes where it
   raises end-to-end throughput most (max-min over the stages), which moves
   instances between stages; those moves apply at once.
4. anti-flap: a tolerance band, stabilization windows per direction (up: the
   lowest recommendation in the window, down: the highest), a maximum step,
   and never below what carries the load measured now. Starting pods count
   as capacity on the way; stale or missing metrics hold the size.

The constants below were tuned with `disagfusion simulate` on the builtin
traces (seed 0) and checked on other seeds (README, "Scheduling").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from disagfusion.scheduling.capacity import servers_for
from disagfusion.scheduling.planner import allocate, mean_service_times, slo_slack, split_wait
from disagfusion.scheduling.profile import STAGES, Profile, RequestShape
from disagfusion.scheduling.scaling import (
    Decision,
    Knobs,
    Snapshot,
    StageDecision,
    StageObservation,
    accelerators_of,
    mix_or_default,
)

DEFAULT_SLO = "2x"
WAIT_SHARE = 0.2  # share of the SLO slack the mean queueing wait may use
RATIO_SMOOTHING = 0.3  # weight of the newest observed/predicted service-time ratio
RATIO_BOUNDS = (0.2, 5.0)
SLO_TARGET = 0.99
TRENDS_KEPT_S = 600.0
SHORT_TREND_S = 180.0
RISE_Z = 3.0  # standard errors a rise must clear to count as a ramp
JUMP_Z = 2.0  # Poisson standard deviations a new rate must clear to count as a jump
RAMP_HEADROOM = 0.9  # utilization cap multiplier while a ramp is forecast
RATE_WINDOW_S = 60.0  # the window the arrival rate is measured over (rate()[1m])
Mix = tuple[tuple[RequestShape, float], ...]


@dataclass(frozen=True)
class HybridState:
    ratios: Mapping[str, float] = field(default_factory=dict)  # observed / predicted time
    rates: tuple[tuple[float, float], ...] = ()  # (time, arrival rate) for the trend
    recommendations: Mapping[str, tuple[tuple[float, int], ...]] = field(default_factory=dict)
    wait_scale: float = 1.0  # < 1 after SLO misses: a tighter wait budget


@dataclass(frozen=True)
class _Need:
    predicted: int  # model only
    wanted: int  # model scaled by feedback, plus backlog
    service_time_s: float
    why: str


class HybridPolicy:
    name = "hybrid"

    def initial_state(self) -> HybridState:
        return HybridState()

    def decide(
        self, snapshot: Snapshot, state: HybridState, profile: Profile, knobs: Knobs
    ) -> Decision:
        budget = knobs.max_gpus or profile.default_gpus
        accs = accelerators_of(snapshot, profile)
        if knobs.mode == "Disabled":
            return _hold(snapshot, state, accs, "autoscaling disabled")
        age = snapshot.metrics_age_s
        if age is None or snapshot.arrival_rps is None:
            return _hold(snapshot, state, accs, "no metrics: holding", ok=False)
        if age > knobs.stale_after_s:
            return _hold(snapshot, state, accs, f"metrics {age:.0f}s old: holding", ok=False)
        if any(s not in snapshot.stages for s in STAGES):
            missing = ", ".join(s for s in STAGES if s not in snapshot.stages)
            return _hold(snapshot, state, accs, f"no metrics for {missing}: holding", ok=False)

        now = snapshot.now
        mix = mix_or_default(snapshot, profile)
        rate = max(0.0, snapshot.arrival_rps)
        rates = (*((t, r) for t, r in state.rates if now - t <= TRENDS_KEPT_S), (now, rate))
        wait_scale = _next_wait_scale(state.wait_scale, snapshot.slo_attainment)
        slack = _slo_slack(profile, knobs, mix, accs)
        times = mean_service_times(profile, accs, mix)
        waits = split_wait(times, WAIT_SHARE * wait_scale * slack)
        # New pods serve after start-up; look that far ahead, less what the SLO lets the
        # queue absorb meanwhile (a 10-minute video SLO needs no forecast at all).
        lead = profile.startup_seconds + knobs.interval_s
        horizon = (
            knobs.forecast_seconds
            if knobs.forecast_seconds is not None
            else max(0.0, lead - (1 - WAIT_SHARE) * slack)
        )
        # A long fit for a steady level, a short one to catch a ramp early.
        level, rise = _trend(rates, now)
        _, short_rise = _trend(tuple(p for p in rates if now - p[0] <= SHORT_TREND_S), now)
        rise = max(rise, short_rise)
        forecast = level + rise * horizon
        # While a ramp is under way the forecast is least sure: keep more headroom.
        cap = knobs.target_utilization * (RAMP_HEADROOM if rise * horizon > 0 else 1.0)
        ratios = dict(state.ratios)
        needs: dict[str, _Need] = {}
        for stage in STAGES:
            obs = snapshot.stages[stage]
            predicted_t = times[stage]
            ratios[stage] = _next_ratio(ratios.get(stage, 1.0), obs.service_time_s, predicted_t)
            queued = obs.queue_depth or 0.0
            if stage == STAGES[0]:  # the gateway's waiting requests are the encoder's backlog too
                queued += snapshot.waiting or 0.0
            needs[stage] = _need(
                queued, forecast, rate, predicted_t, ratios[stage], waits[stage], knobs, lead, cap
            )

        wanted = {
            s: min(max(needs[s].wanted, knobs.min_for(s)), knobs.max_for(s, budget or 10**6))
            for s in STAGES
        }
        limited = {s: "max" for s in STAGES if needs[s].wanted > wanted[s]}
        gpus = {s: profile.gpus_per_instance(s, accs[s]) for s in STAGES}
        over_budget = budget is not None and sum(wanted[s] * gpus[s] for s in STAGES) > budget
        if over_budget and budget is not None:
            balanced = allocate(
                capacity_rps={s: 1.0 / max(needs[s].service_time_s, 1e-9) for s in STAGES},
                gpus_per_instance=gpus,
                accelerators=accs,
                budget_gpus=budget,
                minimum={s: knobs.min_for(s) for s in STAGES},
                maximum={s: knobs.max_for(s, budget) for s in STAGES},
                wanted=wanted,
                accelerator_counts={a.name: a.count for a in profile.accelerators},
            )
            limited.update({s: "budget" for s in STAGES if balanced[s] < wanted[s]})
            wanted = balanced

        kept = max(knobs.scale_down_window_s, knobs.scale_up_window_s)
        recs = {
            s: (
                *((t, n) for t, n in state.recommendations.get(s, ()) if now - t < kept),
                (now, wanted[s]),
            )
            for s in STAGES
        }
        decisions = {
            s: _stabilize(
                snapshot.stages[s], wanted[s], needs[s], recs[s], rate, knobs, over_budget
            )
            for s in STAGES
        }
        if budget is not None:
            decisions = _fit_budget(decisions, snapshot, gpus, budget)
        out = {
            s: StageDecision(
                replicas=decisions[s][0],
                accelerator=accs[s],
                predicted=needs[s].predicted,
                reason=decisions[s][1],
                limited=limited.get(s, ""),
            )
            for s in STAGES
        }
        new_state = HybridState(
            ratios=ratios, rates=rates, recommendations=recs, wait_scale=wait_scale
        )
        throughput = min(out[s].replicas / max(needs[s].service_time_s, 1e-9) for s in STAGES)
        return Decision(stages=out, state=new_state, predicted_throughput_rps=throughput)


def _hold(
    snapshot: Snapshot,
    state: HybridState,
    accs: Mapping[str, str],
    why: str,
    ok: bool = True,
) -> Decision:
    stages = {}
    for s in STAGES:
        obs = snapshot.stages.get(s)
        n = obs.desired if obs is not None else 0
        stages[s] = StageDecision(
            replicas=n, accelerator=accs[s], predicted=n, reason=f"{why} at {n}"
        )
    return Decision(stages=stages, state=state, metrics_ok=ok)


def _trend(points: tuple[tuple[float, float], ...], now: float) -> tuple[float, float]:
    """The arrival rate now and its rise (req/s per s), by least squares over the history.

    Each point is already a windowed rate; a line through the last minutes
    removes most of the sampling noise (which would otherwise size the stages
    for noise peaks) without the lag of a plain average. The rise counts only
    beyond three standard errors, so noise is not mistaken for a ramp.
    """
    n = len(points)
    if n < 4 or points[-1][0] - points[0][0] <= 0:
        return points[-1][1], 0.0
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    slope = sum((t - mt) * (r - mr) for t, r in points) / var
    intercept = mr - slope * mt
    residual = sum((r - intercept - slope * t) ** 2 for t, r in points) / (n - 2)
    rise = max(0.0, slope - RISE_Z * math.sqrt(residual / var))
    # A step the line has not caught up with yet (either way): keep the level within
    # the sampling noise of the newest windowed Poisson count.
    fitted = mr + slope * (now - mt)
    newest = points[-1][1]
    noise = JUMP_Z * math.sqrt(max(fitted, newest, 0.0) / RATE_WINDOW_S)
    level = min(max(fitted, newest - noise), newest + noise)
    return max(0.0, level), rise


def _next_ratio(previous: float, observed: float | None, predicted: float) -> float:
    if observed is None or observed <= 0 or predicted <= 0:
        return previous
    raw = min(max(observed / predicted, RATIO_BOUNDS[0]), RATIO_BOUNDS[1])
    return previous + RATIO_SMOOTHING * (raw - previous)


def _next_wait_scale(previous: float, attainment: float | None) -> float:
    if attainment is None:
        return previous
    if attainment < SLO_TARGET:
        return max(0.1, previous * 0.7)
    return min(1.0, previous * 1.1)


def _slo_slack(profile: Profile, knobs: Knobs, mix: Mix, accs: Mapping[str, str]) -> float:
    """Seconds a typical request may spend queueing in all and still meet the SLO."""
    slack, unloaded = slo_slack(profile, accs, mix, knobs.slo or profile.default_slo or DEFAULT_SLO)
    return max(slack, 0.05 * unloaded)


def _need(
    queued: float,
    forecast: float,
    rate: float,
    predicted_t: float,
    ratio: float,
    wait: float,
    knobs: Knobs,
    lead: float,
    cap: float,
) -> _Need:
    predicted = servers_for(forecast, predicted_t, wait, max_utilization=cap)
    t = predicted_t * ratio
    model = servers_for(forecast, t, wait, max_utilization=cap)
    why = f"{forecast:.3g} req/s x {t:.3g}s"
    if abs(ratio - 1) >= 0.05:
        why += f" (observed/predicted {ratio:.2f})"
    expected_queue = rate * wait
    backlog = queued - expected_queue
    extra = 0
    if backlog > 1:
        extra = math.ceil(backlog * t / max(knobs.drain_seconds, lead))
        why += f", backlog {queued:.0f} +{extra}"
    return _Need(predicted=predicted, wanted=model + extra, service_time_s=t, why=why)


def _stabilize(
    obs: StageObservation,
    wanted: int,
    need: _Need,
    recs: tuple[tuple[float, int], ...],
    rate: float,
    knobs: Knobs,
    rebalancing: bool,
) -> tuple[int, str]:
    now = recs[-1][0]
    current = obs.desired  # includes starting pods: capacity already on the way
    if wanted == current:
        return current, f"steady at {current}: {need.why}"
    if wanted > current:
        window = [n for t, n in recs if now - t <= knobs.scale_up_window_s]
        target = min(window) if window else wanted
        if current:  # from nothing (first start) the whole size at once
            target = min(target, current + max(knobs.max_step_up, current))
        if target <= current:
            return current, f"holding {current}: scale-up window ({need.why})"
        if current and (target - current) / current <= knobs.tolerance:
            return current, f"holding {current}: within tolerance ({need.why})"
        return target, f"up {current}->{target}: {need.why}"
    if rebalancing:  # the budget is full: moving pods to the bottleneck applies at once
        return wanted, f"down {current}->{wanted}: budget moved to the bottleneck ({need.why})"
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


def _fit_budget(
    decisions: dict[str, tuple[int, str]],
    snapshot: Snapshot,
    gpus: Mapping[str, int],
    budget: int,
) -> dict[str, tuple[int, str]]:
    """Holding some stages may leave the sum over budget: trim the growing ones."""
    total = sum(decisions[s][0] * gpus[s] for s in STAGES)
    if total <= budget:
        return decisions
    out = dict(decisions)
    for s in reversed(STAGES):
        current = snapshot.stages[s].desired
        n, why = out[s]
        while total > budget and n > current:
            n -= 1
            total -= gpus[s]
        if (n, why) != out[s]:
            out[s] = (n, f"{why}; trimmed to {n} by the GPU budget")
    return out
