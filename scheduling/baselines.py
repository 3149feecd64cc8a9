"""Baseline scaling policies the simulator compares the hybrid policy with (pure).

Each implements the `Policy` protocol of scaling.py and carries `interval_s`,
how often it runs:

- `static-monolithic`: every replica runs the whole pipeline on enough GPUs to
  hold all three models. Sized for the trace's MEAN load by the planner's own
  rule (utilization <= 0.8, mean queueing wait within the planner's share of
  the SLO slack), so it is comparable with `static-disagg`; clipped to the budget.
- `static-disagg`: the planner's pool for the trace's mean rate and mix
  (`plan_for_rate`), or its best pool for the budget when that does not fit.
- `threshold`: the LightX2V controller (docs/calibration.md): polls every 2 s;
  when mean utilization (busy over ready instances, all stages) > 80 % or a
  queue > 2, adds one instance to the stage with the highest queue score
  (queued per ready instance, then utilization); removes one from a stage
  under 20 % utilization with an empty queue; 30 s cooldown per stage.
- `hpa`: a Kubernetes HPA v2 per stage on utilization (busy / ready) with a
  target of 0.7 (our pick: below the hybrid's 0.9 cap, since HPA has no
  queue signal and needs headroom to see a backlog coming). Default behaviour:
  desired = ceil(current * util / target) (starting pods count as idle, as
  HPA counts unready pods for a scale-up), tolerance 0.1, scale-down to the
  highest recommendation of the last 300 s, scale-up by at most
  max(+100 %, +4 pods) per 15 s.
- `oracle`: knows every future arrival and exact service time. Every 15 s it
  sizes each stage (capacity.servers_for) for the work that will reach it in
  each window up to now + startup + horizon, and keeps the largest: pods start
  exactly startup seconds before they are needed, and a pod whose work comes
  back within a start-up time is kept (re-creating it would cost more). Its
  mean-wait budget is 30 % of the SLO slack of the 5th-percentile request
  (a slowdown SLO binds the short requests), on static-disagg's accelerators.

All of them keep the GPU budget (and accelerator counts) themselves.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from disagfusion.scheduling.budget import NO_BUDGET, most_starved_first
from disagfusion.scheduling.capacity import servers_for
from disagfusion.scheduling.planner import plan_for_gpus, plan_for_rate, stage_wait_budgets
from disagfusion.scheduling.profile import Profile, RequestShape, parse_slo
from disagfusion.scheduling.scaling import (
    Decision,
    Knobs,
    Policy,
    PolicyBase,
    Snapshot,
    StageDecision,
    accelerators_of,
    queued_for,
)
from disagfusion.scheduling.sim.simulate import Future
from disagfusion.scheduling.stages import MONOLITHIC, STAGES
from disagfusion.scheduling.traces import TraceRequest, shape_mix

POLICY_NAMES = (
    "static-monolithic",
    "static-disagg",
    "threshold",
    "hpa",
    "hybrid",
    "oracle",
    "hybrid-pools",
)
Mix = tuple[tuple[RequestShape, float], ...]


@dataclass(frozen=True)
class Load:
    """A trace's mean rate and shape mix (what the static pools are sized for)."""

    rate_rps: float
    mix: Mix

    @classmethod
    def of(cls, requests: Sequence[TraceRequest], profile: Profile) -> Load:
        if not requests:
            return cls(0.0, ((profile.default_request, 1.0),))
        span = max(requests[-1].t, 1.0)
        return cls(len(requests) / span, shape_mix(requests))


def _decision(
    sizes: Mapping[str, int], accs: Mapping[str, str], why: Mapping[str, str], state: Any
) -> Decision:
    return Decision(
        stages={
            s: StageDecision(replicas=n, accelerator=accs[s], predicted=n, reason=why.get(s, ""))
            for s, n in sizes.items()
        },
        state=state,
    )


class StaticPolicy(PolicyBase):
    """Fixed sizes, whatever happens."""

    interval_s = 3600.0  # nothing to decide; run rarely

    def __init__(
        self, name: str, sizes: Mapping[str, tuple[int, str]], monolithic: bool = False
    ) -> None:
        self.name = name
        self.sizes = dict(sizes)
        self.monolithic = monolithic

    def initial_state(self) -> None:
        return None

    def decide(self, snapshot: Snapshot, state: Any, profile: Profile, knobs: Knobs) -> Decision:
        sizes = {s: n for s, (n, _) in self.sizes.items()}
        accs = {s: a for s, (_, a) in self.sizes.items()}
        return _decision(sizes, accs, {s: f"static at {n}" for s, n in sizes.items()}, state)


def static_disagg(profile: Profile, load: Load, gpus: int, slo: str) -> StaticPolicy:
    plan = plan_for_rate(profile, load.rate_rps, load.mix, slo) if load.rate_rps > 0 else None
    if plan is None or plan.gpus > gpus:
        plan = plan_for_gpus(profile, gpus, load.mix)
    return StaticPolicy(
        "static-disagg", {s: (p.replicas, p.accelerator) for s, p in plan.stages.items()}
    )


def static_monolithic(profile: Profile, load: Load, gpus: int, slo: str) -> StaticPolicy:
    acc = profile.default_accelerator(MONOLITHIC)
    assignment = dict.fromkeys(STAGES, acc)
    per = profile.gpus_per_instance(MONOLITHIC, acc)
    count = profile.accelerator(acc).count
    most = min(gpus, count if count is not None else gpus) // per
    total_w = sum(w for _, w in load.mix)
    service = (
        sum(w * profile.service_time(s, acc, shape) for shape, w in load.mix for s in STAGES)
        / total_w
    )
    wait = sum(stage_wait_budgets(profile, assignment, load.mix, slo).values())
    n = servers_for(load.rate_rps, service, wait, 0.8) if load.rate_rps > 0 else 1
    return StaticPolicy("static-monolithic", {MONOLITHIC: (max(1, min(n, most)), acc)}, True)


def _hold(snapshot: Snapshot, profile: Profile, state: Any, why: str) -> Decision:
    accs = accelerators_of(snapshot, profile)
    sizes = {s: snapshot.stages[s].desired if s in snapshot.stages else 1 for s in STAGES}
    return _decision(sizes, accs, dict.fromkeys(STAGES, why), state)


def _budget(profile: Profile, knobs: Knobs) -> int:
    return knobs.max_gpus or profile.default_gpus or NO_BUDGET


class ThresholdPolicy(PolicyBase):
    """The LightX2V controller rule (see the module docstring)."""

    name = "threshold"
    interval_s = 2.0
    scale_out_utilization = 0.8
    queue_limit = 2.0
    scale_in_utilization = 0.2
    cooldown_s = 30.0

    def initial_state(self) -> dict[str, float]:
        return {}  # stage -> time of its last change

    def decide(
        self, snapshot: Snapshot, state: dict[str, float], profile: Profile, knobs: Knobs
    ) -> Decision:
        if any(s not in snapshot.stages for s in STAGES):
            return _hold(snapshot, profile, state, "no metrics: holding")
        now, obs = snapshot.now, snapshot.stages
        accs = accelerators_of(snapshot, profile)
        gpus = {s: profile.gpus_per_instance(s, accs[s]) for s in STAGES}
        sizes = {s: obs[s].desired for s in STAGES}
        util = {
            s: (obs[s].busy or 0.0) / obs[s].ready
            if obs[s].ready and obs[s].busy is not None
            else None
            for s in STAGES
        }
        ready = sum(obs[s].ready for s in STAGES)
        mean_util = sum(obs[s].busy or 0.0 for s in STAGES) / ready if ready else 0.0
        queues = {s: queued_for(snapshot, s) for s in STAGES}
        new_state = dict(state)
        why = {s: f"holding {sizes[s]}" for s in STAGES}

        def cooled(s: str) -> bool:
            return now - new_state.get(s, -math.inf) >= self.cooldown_s

        if mean_util > self.scale_out_utilization or max(queues.values()) > self.queue_limit:
            used = sum(sizes[s] * gpus[s] for s in STAGES)
            room = [s for s in STAGES if cooled(s) and used + gpus[s] <= _budget(profile, knobs)]
            if room:
                s = max(room, key=lambda s: (queues[s] / max(obs[s].ready, 1), util[s] or 0.0))
                sizes[s] += 1
                new_state[s] = now
                why[s] = f"out to {sizes[s]}: utilization {mean_util:.0%}, queue {queues[s]:.0f}"
        for s in STAGES:
            u = util[s]
            low = u is not None and u < self.scale_in_utilization and queues[s] == 0
            if low and cooled(s) and sizes[s] > knobs.min_for(s):
                sizes[s] -= 1
                new_state[s] = now
                why[s] = f"in to {sizes[s]}: utilization {u:.0%}"
        return _decision(sizes, accs, why, new_state)


class HpaPolicy(PolicyBase):
    """One HPA v2 per stage on busy/ready utilization (see the module docstring)."""

    name = "hpa"
    interval_s = 15.0
    target = 0.7
    tolerance = 0.1
    down_window_s = 300.0
    up_pods = 4
    up_percent = 1.0

    def initial_state(self) -> dict[str, tuple[tuple[float, int], ...]]:
        return {}  # stage -> recent (time, recommendation)

    def recommend(self, current: int, ready: int, busy: float | None) -> int:
        """The HPA's raw recommendation from utilization (no stabilization)."""
        if not ready or busy is None:
            return current
        ratio = busy / ready / self.target
        if abs(ratio - 1) <= self.tolerance:
            return current
        want = math.ceil(busy / self.target - 1e-9)
        if (ratio > 1 and want < current) or (ratio < 1 and want > current):
            return current  # counting starting pods as idle flipped the direction
        return want

    def decide(
        self,
        snapshot: Snapshot,
        state: Mapping[str, tuple[tuple[float, int], ...]],
        profile: Profile,
        knobs: Knobs,
    ) -> Decision:
        if any(s not in snapshot.stages for s in STAGES):
            return _hold(snapshot, profile, state, "no metrics: holding")
        now, budget = snapshot.now, _budget(profile, knobs)
        accs = accelerators_of(snapshot, profile)
        gpus = {s: profile.gpus_per_instance(s, accs[s]) for s in STAGES}
        current, wanted, new_state = {}, {}, {}
        for s in STAGES:
            obs = snapshot.stages[s]
            current[s] = obs.desired
            rec = self.recommend(obs.desired, obs.ready, obs.busy)
            rec = min(max(rec, knobs.min_for(s)), knobs.max_for(s, budget))
            recs = (
                *((t, n) for t, n in state.get(s, ()) if now - t < self.down_window_s),
                (now, rec),
            )
            new_state[s] = recs
            if rec < obs.desired:
                wanted[s] = min(obs.desired, max(n for _, n in recs))
            elif rec > obs.desired:
                most = max(
                    math.ceil(obs.desired * (1 + self.up_percent)), obs.desired + self.up_pods
                )
                wanted[s] = min(rec, most)
            else:
                wanted[s] = obs.desired
        sizes = most_starved_first(
            wanted, current, gpus, accs, budget, profile.accelerator_counts()
        )
        why = {s: f"{current[s]}->{sizes[s]} (wanted {wanted[s]})" for s in STAGES}
        return _decision(sizes, accs, why, new_state)


class OraclePolicy(PolicyBase):
    """Sizes from the exact future (see the module docstring): the bound, not a policy."""

    name = "oracle"
    interval_s = 15.0
    horizon_s = 120.0
    wait_share = 0.3  # share of the SLO slack the mean wait may use (split by service time)

    def __init__(self, accelerators: Mapping[str, str]) -> None:
        self.accs = dict(accelerators)
        self.arrivals: Sequence[float] = ()
        self.prefix: dict[str, list[float]] = {}
        self.offset: dict[str, float] = {}
        self.short = 0.0

    def prepare(self, future: Future) -> None:
        self.arrivals = future.arrivals
        n = max(len(future.arrivals), 1)
        upstream = 0.0
        totals = [0.0] * len(future.arrivals)
        for s in STAGES:
            times = future.service(s, self.accs[s])
            totals = [a + b for a, b in zip(totals, times, strict=True)]
            prefix = [0.0]
            for x in times:
                prefix.append(prefix[-1] + x)
            self.prefix[s] = prefix
            self.offset[s] = upstream  # when this stage's work arrives, after the gateway
            upstream += prefix[-1] / n
        # A slowdown SLO binds the short requests: FIFO makes them wait as long as the
        # long ones. Size the slack for the 5th percentile of the requests' compute time.
        totals.sort()
        self.short = totals[len(totals) // 20] if totals else upstream

    def initial_state(self) -> None:
        return None

    def _servers(self, s: str, t0: float, t1: float, backlog: float, wait: float) -> int:
        off = self.offset[s]
        lo = bisect.bisect_left(self.arrivals, t0 - off)
        hi = bisect.bisect_left(self.arrivals, t1 - off)
        if hi <= lo and backlog <= 0:
            return 0
        prefix = self.prefix[s]
        mean = (
            (prefix[hi] - prefix[lo]) / (hi - lo)
            if hi > lo
            else prefix[-1] / max(len(prefix) - 1, 1)
        )
        # Queued requests must start within the wait budget too: one server each per
        # max(wait, S) seconds, on top of what the arrivals need.
        extra = math.ceil(backlog * mean / max(wait, mean)) if backlog > 0 else 0
        return servers_for((hi - lo) / (t1 - t0), mean, wait) + extra

    def decide(self, snapshot: Snapshot, state: Any, profile: Profile, knobs: Knobs) -> Decision:
        now, budget = snapshot.now, _budget(profile, knobs)
        kind, value = parse_slo(profile.slo_or_default(knobs.slo))
        hops = profile.handoff_seconds * (len(STAGES) - 1)
        base = self.short + hops
        slack = max(base * (value - 1) if kind == "slowdown" else value - base, 0.05 * base)
        total = sum(self.prefix[s][-1] for s in STAGES) or 1.0
        gpus = {s: profile.gpus_per_instance(s, self.accs[s]) for s in STAGES}
        h = max(self.horizon_s, 2 * self.interval_s)
        reach = profile.startup_seconds + h
        wanted, why = {}, {}
        for s in STAGES:
            wait = self.wait_share * slack * self.prefix[s][-1] / total
            obs = snapshot.stages.get(s)
            backlog = queued_for(snapshot, s) if obs is not None else 0.0
            need, t0 = 0, now
            while t0 < now + reach:
                need = max(need, self._servers(s, t0, t0 + h, backlog if t0 == now else 0.0, wait))
                t0 += h
            wanted[s] = max(need, knobs.min_for(s))
            why[s] = f"exact work up to +{reach:.0f}s needs {wanted[s]}"
        current = {
            s: snapshot.stages[s].desired if s in snapshot.stages else wanted[s] for s in STAGES
        }
        sizes = most_starved_first(
            wanted, current, gpus, self.accs, budget, profile.accelerator_counts()
        )
        return _decision(sizes, self.accs, why, state)


def make_policy(
    name: str, profile: Profile, requests: Sequence[TraceRequest], gpus: int, slo: str
) -> Policy:
    """The named policy, sized (static ones) or informed (oracle) for this trace.
    KeyError names the known policies."""
    load = Load.of(requests, profile)
    if name == "static-disagg":
        return static_disagg(profile, load, gpus, slo)
    if name == "static-monolithic":
        return static_monolithic(profile, load, gpus, slo)
    if name == "threshold":
        return ThresholdPolicy()
    if name == "hpa":
        return HpaPolicy()
    if name == "hybrid":
        from disagfusion.scheduling.hybrid import HybridPolicy

        return HybridPolicy()
    if name == "hybrid-pools":
        from disagfusion.scheduling.hybrid_pools import HybridPoolsPolicy

        return HybridPoolsPolicy()
    if name == "oracle":
        plan = static_disagg(profile, load, gpus, slo)
        return OraclePolicy({s: acc for s, (_, acc) in plan.sizes.items()})
    raise KeyError(f"unknown policy {name!r} (known: {', '.join(POLICY_NAMES)})")
