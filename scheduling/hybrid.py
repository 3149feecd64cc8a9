"""The hybrid scaling policy: a performance model, corrected by runtime feedback (pure).

One decision is a chain of small pure steps (after Ray Serve's
autoscaling_policy.py), each a function of data below:

1. hold (`hold_reason`): disabled, stale or missing metrics hold the size.
2. model: the profile predicts seconds per request for the observed shape
   mix; over a mix of short and long shapes that mean is noisy from one
   window to the next, so it is smoothed as much as it is noisy
   (`next_times`). The arrival rate is forecast (forecast.py) over the lead
   time a new pod needs that the SLO cannot absorb by queueing
   (`lead_and_horizon`). Rate and service time give the pool size whose mean
   queueing wait (Erlang C) fits the stage's share of the SLO slack
   (`queueing_slack`), capped at the target utilization, a little lower while
   a ramp is forecast (`utilization_cap`). The mix's short requests
   (short_requests.py) may have far less slack than the mean (a slowdown
   SLO), which a mean wait hides: each stage also keeps the chance that one
   of them waits past its slack small (`tail_rules`, capacity.servers_for_tail). That
   is `predicted`. A stage that may batch is sized for the batch its
   instances settle at under the forecast rate (capacity.batched_servers_for),
   so fewer instances may do.
3. feedback, the scale factor: the observed/predicted service-time ratio
   (smoothed, and moved less the noisier the observed mean, `next_ratios`)
   rescales the model; a backlog beyond the expected queue adds pods to
   drain it (`stage_need`); SLO misses shrink the wait budget and meeting it
   relaxes it again (`next_wait_scale`).
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
from dataclasses import dataclass, field, replace

from disagfusion.scheduling.budget import NO_BUDGET, grow, max_min
from disagfusion.scheduling.capacity import Pool, batched_servers_for, servers_for_tail
from disagfusion.scheduling.forecast import RatePoints, forecast, rate_history
from disagfusion.scheduling.planner import mean_service_times, slo_slack, split_wait
from disagfusion.scheduling.profile import (
    BatchTerm,
    Profile,
    batch_at_rate,
    batch_factor,
)
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
from disagfusion.scheduling.short_requests import (
    NO_TAIL,
    SLO_TARGET,
    WAIT_SHARE,
    Mix,
    Tail,
    service_cv2,
    tail_rules,
)
from disagfusion.scheduling.stages import STAGES

RATIO_SMOOTHING = 0.3  # weight of the newest observed/predicted service-time ratio
RATIO_BOUNDS = (0.2, 5.0)
RATIO_NOISE_OK = 0.05  # relative error of an observed mean the smoothing takes at full weight
OBSERVED_WINDOW_S = 60.0  # what the observed service time is averaged over (the rate window)
RAMP_HEADROOM = 0.9  # utilization cap multiplier while a ramp is forecast
Recommendations = Mapping[str, tuple[tuple[float, int], ...]]  # stage -> (time, wanted)


@dataclass(frozen=True)
class HybridState:
    ratios: Mapping[str, float] = field(default_factory=dict)  # observed / predicted time
    rates: RatePoints = ()  # (time, arrival rate) for the trend
    recommendations: Recommendations = field(default_factory=dict)
    wait_scale: float = 1.0  # < 1 after SLO misses: a tighter wait budget
    # stage -> (accelerator, smoothed mean service time of the mix there)
    times: Mapping[str, tuple[str, float]] = field(default_factory=dict)


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
    service_time_s: float  # instance-seconds per request at `batch`: t(B)/B
    why: str
    batch: int = 1  # requests per call the model expects at the forecast rate


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
        cv2 = service_cv2(profile, accs, mix)
        times = next_times(state.times, mean_service_times(profile, accs, mix), accs, cv2, rate)
        waits = split_wait(times, WAIT_SHARE * wait_scale * slack)
        tails = tail_rules(profile, knobs, mix, accs, cv2)
        lead, horizon = lead_and_horizon(profile, knobs, slack)
        rate_ahead, ramp = forecast(rates, now, horizon)
        cap = utilization_cap(knobs.target_utilization, ramp)
        outlook = Outlook(rate, rate_ahead, lead, cap, knobs.drain_seconds)
        costs = {s: profile.stages[s][accs[s]] for s in STAGES}
        basis = observed_basis(snapshot, profile, accs, times)
        ratios = next_ratios(state.ratios, snapshot, basis, cv2)
        needs = {
            s: stage_need(
                queued_for(snapshot, s),
                times[s],
                ratios[s],
                waits[s],
                outlook,
                costs[s].batch,
                costs[s].max_batch,
                tails[s],
            )
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
            ratios=ratios,
            rates=rates,
            recommendations=recs,
            wait_scale=wait_scale,
            times={s: (accs[s], times[s]) for s in STAGES},
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


def observed_basis(
    snapshot: Snapshot, profile: Profile, accs: Mapping[str, str], times: Mapping[str, float]
) -> dict[str, float]:
    """What each stage's observed service time should be if the model is right.

    The observed time is instance-seconds per completed request, so on a stage
    that batches it is t(B)/B at the batch its ready instances form at the rate
    measured now, not t(1): batching must not read as a faster (or slower) GPU.
    """
    rate = max(0.0, snapshot.arrival_rps or 0.0)
    out = dict(times)
    for s in STAGES:
        cost = profile.stages[s][accs[s]]
        if cost.batching and s in snapshot.stages:
            ready = max(1, snapshot.stages[s].ready)
            size = batch_at_rate(rate / ready, times[s], cost.batch, cost.max_batch)
            out[s] = times[s] * batch_factor(cost.batch, size) / size
    return out


def next_ratios(
    previous: Mapping[str, float],
    snapshot: Snapshot,
    predicted: Mapping[str, float],
    cv2: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The smoothed observed/predicted service-time ratio per stage (the scale factor).

    `cv2` (per stage, the mix's squared coefficient of variation of the service
    time) says how noisy the observed mean is: over n completions of a mix of
    one-second and four-minute requests it is off by cv/√n from the truth even
    when the model is exact, so the noisier it is, the less it moves the ratio."""
    ratios = dict(previous)
    for s in STAGES:
        obs = snapshot.stages[s]
        gain = RATIO_SMOOTHING * _trust((cv2 or {}).get(s, 0.0), obs.throughput_rps)
        ratios[s] = _next_ratio(ratios.get(s, 1.0), obs.service_time_s, predicted[s], gain)
    return ratios


def next_times(
    previous: Mapping[str, tuple[str, float]],
    mix_times: Mapping[str, float],
    accs: Mapping[str, str],
    cv2: Mapping[str, float],
    rate: float,
) -> dict[str, float]:
    """Per stage, the mean service time of the recent mix, smoothed as much as it is noisy.

    A minute of a mix of one-second and four-minute requests holds a dozen long
    ones, give or take four: the mean swings by a quarter from one window to the
    next while the workload stays the same. One shape (cv 0) is taken as is."""
    out = {}
    for s in STAGES:
        acc, before = previous.get(s, ("", math.nan))
        now = mix_times[s]
        if acc != accs[s] or not math.isfinite(before):
            out[s] = now  # first round, or another accelerator: nothing to smooth with
        else:
            out[s] = before + _trust(cv2.get(s, 0.0), rate) * (now - before)
    return out


def _trust(cv2: float, per_second: float | None) -> float:
    """In (0, 1]: how much to believe a mean over the window's requests (`per_second`
    of them) of a workload whose squared coefficient of variation is `cv2`; 1 when its
    relative error is well within RATIO_NOISE_OK."""
    if cv2 <= 0:
        return 1.0
    completions = max(1.0, (per_second or 0.0) * OBSERVED_WINDOW_S)
    error2 = cv2 / completions  # squared relative standard error of the mean
    return 1 / (1 + error2 / RATIO_NOISE_OK**2)


def _next_ratio(
    previous: float, observed: float | None, predicted: float, gain: float = RATIO_SMOOTHING
) -> float:
    if observed is None or observed <= 0 or predicted <= 0:
        return previous
    raw = min(max(observed / predicted, RATIO_BOUNDS[0]), RATIO_BOUNDS[1])
    return previous + gain * (raw - previous)


def stage_need(
    queued: float,
    predicted_t: float,
    ratio: float,
    wait: float,
    outlook: Outlook,
    batch: BatchTerm = (),
    max_batch: int = 1,
    tail: Tail = NO_TAIL,
) -> Need:
    """The model's pool for the forecast, rescaled by feedback, plus pods to drain a backlog.

    `predicted_t` is one request's time alone; with `batch` and `max_batch` > 1 the
    pool is sized for the batch the forecast rate forms, and the Need's service
    time is per request at that batch. An unbatched pool also keeps `tail`."""
    ahead, cap = outlook.rate_ahead, outlook.utilization_cap
    predicted = _pool(ahead, predicted_t, wait, cap, batch, max_batch, tail).servers
    pool = _pool(ahead, predicted_t * ratio, wait, cap, batch, max_batch, tail)
    model, t = pool.servers, pool.seconds_per_request
    why = f"{ahead:.3g} req/s x {t:.3g}s"
    if pool.batch > 1:
        why += f" at batch {pool.batch}"
    if abs(ratio - 1) >= 0.05:
        why += f" (observed/predicted {ratio:.2f})"
    expected_queue = outlook.rate * wait
    backlog = queued - expected_queue
    extra = 0
    if backlog > 1:
        extra = math.ceil(backlog * t / max(outlook.drain_s, outlook.lead_s))
        why += f", backlog {queued:.0f} +{extra}"
    return Need(
        predicted=predicted, wanted=model + extra, service_time_s=t, why=why, batch=pool.batch
    )


def _pool(
    rate: float,
    t: float,
    wait: float,
    cap: float,
    batch: BatchTerm,
    max_batch: int,
    tail: Tail,
) -> Pool:
    """The mean-wait pool; an unbatched one grown to keep the short requests' tail."""
    pool = batched_servers_for(rate, t, wait, cap, batch, max_batch)
    if pool.batch > 1 or not math.isfinite(tail.max_wait_s):
        return pool  # a batching pool's short requests wait for a batch anyway
    need = servers_for_tail(rate, t, tail.max_wait_s, tail.miss_share, tail.length_bias)
    return pool if need <= pool.servers else replace(pool, servers=need)


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
    # A batching pool runs near busy by design; its headroom is the larger batch.
    cap = knobs.target_utilization if need.batch == 1 else 1.0
    carrying = math.ceil(rate * need.service_time_s / cap)
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
