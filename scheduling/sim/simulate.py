"""Discrete-event simulation of a disaggregated pipeline driven by a real policy (pure).

The cluster: per stage a pool of instances, fed by one queue served in
`SimConfig.queue_order` (queue_order.py: "fifo", or "edf" by the request's
SLO deadline with an aging bound). A pool is on one accelerator type, or on
several when the policy's decision has `pools` (heterogeneous pools): then
dispatch is speed-aware, least expected completion as in the workers
(worker/runtime/dispatch.py): a request goes to the fastest idle instance,
and an idle instance leaves it queued while faster busy ones are expected to
finish every queued request before it would finish the first (expected times
are the profile's, noise-free, as a worker's service-time EWMA). One type:
work-conserving, as before. A
request runs encoder -> denoiser -> decoder; each hop adds
`profile.handoff_seconds` of latency (the instance is free at once: the
hand-off overlaps the next compute). Service time is the profile's prediction
times lognormal(0, sigma) noise, drawn once per request and stage from a
seeded `random.Random`.

Batching: an instance that frees up takes the queue's head and up to
`max_batch` - 1 more queued requests of the head's shape, and serves them in
one call of `StageCost.batch_seconds(shape, B)` (the head's noise). It never
waits for a batch to fill (work-conserving). Observed service time is the
call's seconds over its B requests. With max_batch 1 (the default) this is
one request at a time.

Scaling follows Kubernetes: a new instance holds its GPUs from creation and
serves after `profile.startup_seconds`; pods that do not fit the GPU budget
(or their accelerator's count) wait as pending until GPUs free up. A
scale-down removes pending pods, then starting ones, then idle ones at once,
then lets busy ones finish their request before leaving (drain). A
terminating pod is never revived: growing again starts new pods. The gateway
rejects a request when more than `max_queue` requests wait in all stage
queues together (real workers hold only a couple of payloads each, so
backpressure keeps any backlog in front of the first stage).

The policy runs every `interval_s` on a `Snapshot` built as the operator
builds it from Prometheus: windowed busy instances, service times,
throughput, arrival rate and shape mix. The first decision (t = 0) is made
on a warm snapshot (see `warm_sizes`: a pool sized for the trace's first
five minutes, at steady state) and applied instantly: the cluster was
already running.

`static-monolithic` is simulated as one pool, "monolithic", whose instance
runs all three stages back to back (no hand-offs) on enough GPUs to hold
all three models.

Speed: one heap of tuple events, deques per pool, integer indices,
precomputed noise; GPU-time integrals change only when allocations change.
The benchmark (a day, about a million requests, wall seconds per policy):

    disagfusion simulate --trace builtin:diurnal --profile builtin:qwen-image-h100 \
        --gpus 720 --requests 1000000 --policy static-disagg,hybrid --timing
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from disagfusion.scheduling.budget import gpus_by_accelerator, within_counts
from disagfusion.scheduling.profile import Profile, RequestShape, batch_factor, parse_slo
from disagfusion.scheduling.queue_order import DEFAULT_AGING_S, OrderedQueue, slo_deadline
from disagfusion.scheduling.scaling import Knobs, Policy, Snapshot, StageObservation
from disagfusion.scheduling.stages import MONOLITHIC, STAGES, stages_in
from disagfusion.scheduling.stats import percentiles
from disagfusion.scheduling.traces import TraceRequest

BUSY_WINDOW_S = 30.0  # mean busy instances over this window (like a rate() over 30 s)
RATE_WINDOW_S = 60.0  # arrivals, completions, service times
MIX_WINDOW_S = 120.0
SLO_WINDOW_S = 120.0
DRAIN_LIMIT_S = 24 * 3600.0  # stop this long after the last arrival (a pool left at zero)
_READY, _DONE, _HOP = 0, 1, 2  # event kinds; (time, kind, a, b, c) tuples on one heap


class SimulationError(ValueError):
    """A policy asked for something the cluster cannot be (e.g. an unknown accelerator)."""


@dataclass(frozen=True)
class Future:
    """What an oracle may know in advance: arrivals and exact service times."""

    arrivals: Sequence[float]
    shapes: Sequence[RequestShape]
    service: Callable[[str, str], list[float]]  # (stage, accelerator) -> seconds per request


@dataclass
class SimResult:
    policy: str
    pools: tuple[str, ...]
    requests: int
    completed: int
    rejected: int
    unfinished: int
    duration_s: float
    latencies: list[float]  # completed requests, in completion order
    met: int  # completed within the SLO
    gpu_hours: float
    cost_usd: float
    scale_events: int
    # (time, instances per pool incl. starting and draining) at each decision, for plots
    timeline: list[tuple[float, tuple[int, ...]]] = field(default_factory=list)
    done_times: list[float] = field(default_factory=list)  # with `latencies`, for plots

    def summary(self) -> dict[str, Any]:
        p50, p95, p99 = (
            round(x, 4) if self.latencies else None
            for x in percentiles(self.latencies, (50, 95, 99))
        )
        return {
            "completed": self.completed,
            "rejected": self.rejected,
            "unfinished": self.unfinished,
            "throughput_rps": round(self.completed / self.duration_s, 6) if self.duration_s else 0,
            "latency_p50_s": p50,
            "latency_p95_s": p95,
            "latency_p99_s": p99,
            "slo_attainment": round(self.met / self.requests, 6) if self.requests else None,
            "gpu_hours": round(self.gpu_hours, 4),
            "cost_usd": round(self.cost_usd, 2),
            "scale_events": self.scale_events,
        }


@dataclass(frozen=True)
class SimConfig:
    gpus: int  # the budget: GPUs held by all pods, starting and draining ones included
    slo: str  # "30s" or "2x"; a rejected request misses it
    # Requests queued beyond this are rejected at the gateway. All stage queues count:
    # real workers hold two payloads each, so backpressure keeps a backlog at the gateway.
    max_queue: int
    seed: int = 0
    noise_sigma: float = 0.1
    record: bool = False  # keep the timeline and completion times (plots)
    queue_order: str = "fifo"  # queue_order.QUEUE_ORDERS
    queue_aging_s: float = DEFAULT_AGING_S  # edf: nothing waits behind later deadlines longer
    # Most requests one call serves: one number for every stage, or per stage (missing: 1).
    max_batch: int | Mapping[str, int] = 1

    def batch_limit(self, pool: str) -> int:
        """Max batch of `pool`; a monolithic instance runs a batch through every stage."""
        limits = self.max_batch
        if isinstance(limits, int):
            return limits
        return min(limits.get(s, 1) for s in stages_in(pool))

    def __post_init__(self) -> None:
        limits = self.max_batch
        values = [limits] if isinstance(limits, int) else list(limits.values())
        if not isinstance(limits, int):
            unknown = sorted(set(limits) - set(STAGES))
            if unknown:
                raise ValueError(f"max_batch: unknown stage(s) {', '.join(unknown)}")
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"max_batch must be an integer >= 1, got {value!r}")


def warm_sizes(
    profile: Profile, rate: float, mix: tuple[tuple[RequestShape, float], ...], cfg: SimConfig
) -> dict[str, tuple[int, str]]:
    """Per stage (replicas, accelerator) of a warm cluster: the accelerators of the
    planner's best pool for the whole budget (policies keep a stage's type, so the
    cheapest type for a quiet start could cap them at the peak), sized by the
    planner's rule (`plan_for_rate`: utilization <= 0.8, its share of the SLO slack)
    for `rate`; the whole-budget pool when that does not fit."""
    from disagfusion.scheduling.capacity import servers_for
    from disagfusion.scheduling.planner import (
        mean_service_times,
        plan_for_gpus,
        stage_wait_budgets,
    )

    full = plan_for_gpus(profile, cfg.gpus, mix)
    accs = {s: p.accelerator for s, p in full.stages.items()}
    sizes = {s: (p.replicas, p.accelerator) for s, p in full.stages.items()}
    if rate <= 0:
        return {s: (1, a) for s, a in accs.items()}
    try:
        waits = stage_wait_budgets(profile, accs, mix, cfg.slo)
    except ValueError:  # the SLO leaves no room to queue: hold the whole pool
        return sizes
    times = mean_service_times(profile, accs, mix)
    want = {s: max(1, servers_for(rate, times[s], waits[s], 0.8)) for s in STAGES}
    used = gpus_by_accelerator(
        (accs[s], want[s] * profile.gpus_per_instance(s, accs[s])) for s in STAGES
    )
    if not within_counts(used, profile.accelerator_counts()) or sum(used.values()) > cfg.gpus:
        return sizes
    return {s: (want[s], accs[s]) for s in STAGES}


def initial_load(
    requests: Sequence[TraceRequest], window_s: float = 300.0
) -> tuple[float, tuple[tuple[RequestShape, float], ...]]:
    """Arrival rate and shape mix of the trace's first minutes (what a warm cluster saw)."""
    first = [r for r in requests if r.t < window_s] or list(requests[:20])
    if not first:
        return 0.0, ()
    span = max(window_s if first[-1].t < window_s else first[-1].t, 1e-9)
    counts: dict[RequestShape, int] = {}
    for r in first:
        counts[r.shape] = counts.get(r.shape, 0) + 1
    return len(first) / span, tuple((s, n / len(first)) for s, n in counts.items())


class Simulator:
    """One run of one policy over one trace. Use `run()`."""

    def __init__(
        self,
        profile: Profile,
        requests: Sequence[TraceRequest],
        policy: Policy,
        knobs: Knobs,
        cfg: SimConfig,
    ) -> None:
        self.profile, self.policy, self.knobs, self.cfg = profile, policy, knobs, cfg
        self.arrivals = [r.t for r in requests]
        self.interval = float(policy.interval_s or knobs.interval_s)
        self.mono = policy.monolithic
        self.pools: tuple[str, ...] = (MONOLITHIC,) if self.mono else STAGES
        self.slo_kind, self.slo_value = parse_slo(cfg.slo)
        # Distinct shapes get integer ids; base times are looked up by [stage][acc][shape].
        ids: dict[RequestShape, int] = {}
        self.shape_of = [ids.setdefault(r.shape, len(ids)) for r in requests]
        self.shapes = list(ids)
        self.acc_names = [a.name for a in profile.accelerators]
        self.base = [
            [
                [
                    profile.service_time(s, a, shape) if a in profile.stages[s] else math.nan
                    for shape in self.shapes
                ]
                for a in self.acc_names
            ]
            for s in STAGES
        ]
        # Batch terms by [stage][acc]; factors by (stage, acc, B) are cached in `factor`.
        self.terms = [
            [profile.stages[s][a].batch if a in profile.stages[s] else () for a in self.acc_names]
            for s in STAGES
        ]
        self.factors: dict[tuple[int, int, int], float] = {}
        self.max_batch = [cfg.batch_limit(pool) for pool in self.pools]
        OrderedQueue(cfg.queue_order, cfg.queue_aging_s)  # a bad order fails here, not mid-run
        rng = random.Random(cfg.seed)
        sigma, n = cfg.noise_sigma, len(requests)
        self.noise = [
            [math.exp(rng.gauss(0.0, sigma)) for _ in range(n)] if sigma > 0 else [1.0] * n
            for _ in STAGES
        ]

    # -- what the oracle may see -------------------------------------------------
    def future(self) -> Future:
        def service(stage: str, acc: str) -> list[float]:
            si, ai = STAGES.index(stage), self.acc_names.index(acc)
            base, noise = self.base[si][ai], self.noise[si]
            return [base[k] * noise[i] for i, k in enumerate(self.shape_of)]

        return Future(self.arrivals, [self.shapes[k] for k in self.shape_of], service)

    def run(self) -> SimResult:
        return _Run(self).go()

    def factor(self, stage: int, acc: int, size: int) -> float:
        """batch_factor of `stage` on `acc` at batch `size` (cached: the loop asks often)."""
        key = (stage, acc, size)
        value = self.factors.get(key)
        if value is None:
            value = self.factors[key] = batch_factor(self.terms[stage][acc], size)
        return value


class _Run:
    """The mutable state of one simulation (kept apart so a Simulator can run twice)."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        k = len(sim.pools)
        self.acc = [sim.profile.default_accelerator(pool) for pool in sim.pools]
        self.acc_i = [sim.acc_names.index(a) for a in self.acc]
        self.unloaded = [0.0] * len(sim.arrivals)  # per request: noise-free compute seconds
        cfg = sim.cfg
        self.queue = [OrderedQueue[int](cfg.queue_order, cfg.queue_aging_s) for _ in range(k)]
        self.edf = cfg.queue_order == "edf"
        # edf: per request its SLO deadline, set at the gateway from the shape's unloaded
        # latency on the pools' accelerators then (`deadline_after`, per shape id).
        self.deadline = [0.0] * len(sim.arrivals) if self.edf else []
        self.deadline_after: list[float] = []
        self.batch_of: list[list[int]] = []  # per instance: the requests of its batch call
        self.idle: list[list[int]] = [[] for _ in range(k)]
        self.starting: list[list[int]] = [[] for _ in range(k)]
        self.busy = [0] * k
        self.draining = [0] * k  # busy instances that leave after their request
        self.pending = [0] * k  # pods asked for that do not fit the budget yet
        self.target = [0] * k
        # Heterogeneous pools: the same per accelerator index (they add up to the above).
        self.pool_target: list[dict[int, int]] = [{} for _ in range(k)]
        self.pending_acc: list[dict[int, int]] = [{} for _ in range(k)]
        self.drain_acc: list[dict[int, int]] = [{} for _ in range(k)]
        self.busy_acc: list[dict[int, int]] = [{} for _ in range(k)]
        self.mixed = [False] * k  # more than one accelerator type in the pool now
        # Mixed pools: the busy instances and when each expects to be free (noise-free
        # time, as a worker's service-time EWMA predicts it), for speed-aware dispatch.
        self.running: list[set[int]] = [set() for _ in range(k)]
        self.free_at: list[float] = []
        self.handing = [0] * k
        # Instances: pool, accelerator index, GPUs, state (0 starting, 1 up, 2 gone).
        self.i_pool: list[int] = []
        self.i_acc: list[int] = []
        self.i_gpus: list[int] = []
        self.i_state: list[int] = []
        self.alloc = 0
        self.acc_alloc = dict.fromkeys(sim.acc_names, 0)
        self.price = {a.name: a.cost_per_hour / 3600.0 for a in sim.profile.accelerators}
        self.limit = sim.profile.accelerator_counts()
        self.cost_rate = 0.0
        self.gpu_s = self.cost = 0.0
        self.last_alloc_t = 0.0
        # Windowed metrics: cumulative counters, sampled at each decision.
        self.busy_int = [0.0] * k
        self.busy_t = [0.0] * k
        self.comps = [0] * k
        self.comp_s = [0.0] * k
        self.arrived = 0
        self.samples: deque[tuple[float, list[float], list[int], list[float], int]] = deque()
        self.mix_q: deque[tuple[float, int]] = deque()
        self.mix_n = [0] * len(sim.shapes)
        self.slo_q: deque[tuple[float, int]] = deque()
        self.slo_met = 0
        self.heap: list[tuple[float, int, int, int, float]] = []
        self.now = 0.0
        self.scale_events = 0

    # -- GPUs ------------------------------------------------------------------------
    def _account(self, t: float) -> None:
        dt = t - self.last_alloc_t
        if dt > 0:
            self.gpu_s += self.alloc * dt
            self.cost += self.cost_rate * dt
            self.last_alloc_t = t

    def _free(self, inst: int) -> None:
        self._account(self.now)
        g, a = self.i_gpus[inst], self.sim.acc_names[self.i_acc[inst]]
        self.i_state[inst] = 2
        self.alloc -= g
        self.acc_alloc[a] -= g
        self.cost_rate -= g * self.price[a]

    def _create(self, pool: int, acc_i: int, ready: bool) -> bool:
        acc = self.sim.acc_names[acc_i]
        g = self.sim.profile.gpus_per_instance(self.sim.pools[pool], acc)
        lim = self.limit[acc]
        if self.alloc + g > self.sim.cfg.gpus or (
            lim is not None and self.acc_alloc[acc] + g > lim
        ):
            return False
        self._account(self.now)
        inst = len(self.i_pool)
        self.i_pool.append(pool)
        self.i_acc.append(acc_i)
        self.i_gpus.append(g)
        self.batch_of.append([])
        self.free_at.append(0.0)
        self.alloc += g
        self.acc_alloc[acc] += g
        self.cost_rate += g * self.price[acc]
        if ready:
            self.i_state.append(1)
            self._serve_or_idle(pool, inst)
        else:
            self.i_state.append(0)
            self.starting[pool].append(inst)
            heapq.heappush(
                self.heap, (self.now + self.sim.profile.startup_seconds, _READY, inst, 0, 0.0)
            )
        return True

    def _schedule(self, ready: bool = False) -> None:
        """Start pending pods, one per pool (and type) in turn, while the budget has room."""
        progress = True
        while progress:
            progress = False
            for p in range(len(self.pending)):
                if not self.pending[p]:
                    continue
                for a, n in self.pending_acc[p].items():
                    if n and self._create(p, a, ready):
                        self.pending_acc[p][a] -= 1
                        self.pending[p] -= 1
                        progress = True

    def _live(self, p: int, a: int) -> int:
        """Instances of type `a` in pool p that stay: pending, starting, up, not draining."""
        on_a = sum(1 for i in self.starting[p] if self.i_acc[i] == a) + sum(
            1 for i in self.idle[p] if self.i_acc[i] == a
        )
        return (
            self.pending_acc[p].get(a, 0)
            + on_a
            + self.busy_acc[p].get(a, 0)
            - self.drain_acc[p].get(a, 0)
        )

    def _scale(self, p: int, sizes: Mapping[int, int], main: int) -> None:
        """Pool p to `sizes` instances per accelerator index; `main` names the pool's type
        (SLO deadlines, the snapshot). A type left out goes to zero: its pods leave."""
        self.acc_i[p], self.acc[p] = main, self.sim.acc_names[main]
        self.target[p] = sum(sizes.values())
        self.pool_target[p] = {a: n for a, n in sizes.items() if n}
        present = {self.i_acc[i] for i in self.starting[p] + self.idle[p]}
        kinds = set(sizes) | present | set(self.pending_acc[p]) | set(self.busy_acc[p])
        for a in sorted(kinds):
            extra = self._live(p, a) - sizes.get(a, 0)
            cut = min(extra, self.pending_acc[p].get(a, 0)) if extra > 0 else 0
            self._add_pending(p, a, -cut)
            extra -= cut
            extra = self._free_newest(p, self.starting[p], a, extra)
            extra = self._free_newest(p, self.idle[p], a, extra)
            if extra > 0:  # busy ones finish their request first
                self.draining[p] += extra
                self.drain_acc[p][a] = self.drain_acc[p].get(a, 0) + extra
            elif extra < 0:
                self._add_pending(p, a, -extra)
        # Only a pool asked to hold several types can have several types idle at once.
        self.mixed[p] = not self.sim.mono and len(self.pool_target[p]) > 1

    def _add_pending(self, p: int, a: int, n: int) -> None:
        if n:
            self.pending[p] += n
            self.pending_acc[p][a] = self.pending_acc[p].get(a, 0) + n

    def _free_newest(self, p: int, pods: list[int], a: int, extra: int) -> int:
        """Free up to `extra` of `pods` of type `a`, newest first; what is left to remove."""
        for j in range(len(pods) - 1, -1, -1):
            if extra <= 0:
                break
            if self.i_acc[pods[j]] == a:
                self._free(pods.pop(j))
                extra -= 1
        return extra

    # -- requests --------------------------------------------------------------------
    def _start(self, p: int, inst: int, r: int, t: float) -> None:
        sim = self.sim
        self.busy_int[p] += self.busy[p] * (t - self.busy_t[p])
        self.busy_t[p] = t
        self.busy[p] += 1
        a, k = self.i_acc[inst], sim.shape_of[r]
        self.busy_acc[p][a] = self.busy_acc[p].get(a, 0) + 1
        if sim.mono:
            base = sum(sim.base[s][a][k] for s in range(len(STAGES)))
            st = sum(sim.base[s][a][k] * sim.noise[s][r] for s in range(len(STAGES)))
        else:
            base = sim.base[p][a][k]
            st = base * sim.noise[p][r]
        self.unloaded[r] += base
        if self.mixed[p]:
            self.running[p].add(inst)
            self.free_at[inst] = t + base
        heapq.heappush(self.heap, (t + st, _DONE, inst, r, st))

    def _start_batch(self, p: int, inst: int, batch: list[int], t: float) -> None:
        """One call serving every request of `batch` (one shape) on `inst`."""
        sim = self.sim
        self.busy_int[p] += self.busy[p] * (t - self.busy_t[p])
        self.busy_t[p] = t
        self.busy[p] += 1
        a, head, size = self.i_acc[inst], batch[0], len(batch)
        self.busy_acc[p][a] = self.busy_acc[p].get(a, 0) + 1
        k = sim.shape_of[head]
        stages = range(len(STAGES)) if sim.mono else (p,)
        base = sum(sim.base[s][a][k] for s in stages)
        st = sum(sim.base[s][a][k] * sim.factor(s, a, size) * sim.noise[s][head] for s in stages)
        for r in batch:
            self.unloaded[r] += base
        if self.mixed[p]:
            self.running[p].add(inst)
            self.free_at[inst] = t + sum(sim.base[s][a][k] * sim.factor(s, a, size) for s in stages)
        self.batch_of[inst] = batch
        heapq.heappush(self.heap, (t + st, _DONE, inst, -1, st))

    def _serve_or_idle(self, p: int, inst: int) -> None:
        if self.queue[p] and not (self.mixed[p] and self._leave_to_faster(p, inst)):
            self._take(p, inst, self.now)
        else:
            self.idle[p].append(inst)

    def _leave_to_faster(self, p: int, inst: int) -> bool:
        """Least expected completion: True when faster instances, busy now, are expected
        to finish every queued request of pool p sooner than `inst` would finish the head
        (so a slow instance does not take work a fast one finishes first)."""
        base, k = self.sim.base[p], self.sim.shape_of[self.queue[p].head()]
        mine = self.now + base[self.i_acc[inst]][k]
        sooner = 0  # queued requests faster instances are expected to finish by then
        for j in self.running[p]:
            t = base[self.i_acc[j]][k]
            if t > 0:
                sooner += max(0, int((mine - max(self.free_at[j], self.now)) // t))
        return len(self.queue[p]) <= sooner

    def _wake(self, p: int) -> None:
        """Mixed pools: idle instances left work to faster ones; take it once the queue
        holds more than those will finish first."""
        base = self.sim.base[p]
        while self.queue[p] and self.idle[p]:
            k = self.sim.shape_of[self.queue[p].head()]
            inst = min(self.idle[p], key=lambda i: base[self.i_acc[i]][k])
            if self._leave_to_faster(p, inst):
                return  # the fastest idle one leaves it: so would the slower
            self.idle[p].remove(inst)
            self._take(p, inst, self.now)

    def _take(self, p: int, inst: int, t: float) -> None:
        """`inst` serves the head of its (non-empty) queue, batched when allowed."""
        batch = self.queue[p].pop_batch(self.sim.max_batch[p])
        if len(batch) == 1:
            self._start(p, inst, batch[0], t)
        else:
            self._start_batch(p, inst, batch, t)

    def _set_deadlines(self) -> None:
        """edf: per shape, the SLO deadline after arrival for the current accelerators."""
        sim = self.sim
        hops = 0.0 if sim.mono else sim.profile.handoff_seconds * (len(STAGES) - 1)
        accs = [self.acc_i[0]] * len(STAGES) if sim.mono else self.acc_i
        self.deadline_after = [
            slo_deadline(
                0.0, sum(sim.base[s][accs[s]][k] for s in range(len(STAGES))) + hops, sim.cfg.slo
            )
            for k in range(len(sim.shapes))
        ]

    # -- the snapshot the operator would build ------------------------------------------
    def _snapshot(self, t: float) -> Snapshot:
        k = len(self.sim.pools)
        for p in range(k):
            self.busy_int[p] += self.busy[p] * (t - self.busy_t[p])
            self.busy_t[p] = t
        self.samples.append(
            (t, list(self.busy_int), list(self.comps), list(self.comp_s), self.arrived)
        )
        while len(self.samples) > 1 and self.samples[1][0] <= t - RATE_WINDOW_S:
            self.samples.popleft()
        old = self.samples[0]
        busy_old = next((s for s in self.samples if s[0] >= t - BUSY_WINDOW_S), old)
        span, busy_span = t - old[0], t - busy_old[0]
        while self.mix_q and self.mix_q[0][0] < t - MIX_WINDOW_S:
            self.mix_n[self.mix_q.popleft()[1]] -= 1
        while self.slo_q and self.slo_q[0][0] < t - SLO_WINDOW_S:
            self.slo_met -= self.slo_q.popleft()[1]
        stages = {}
        for p, name in enumerate(self.sim.pools):
            done = self.comps[p] - old[2][p]
            stages[name] = StageObservation(
                ready=len(self.idle[p]) + self.busy[p] - self.draining[p],
                starting=len(self.starting[p]) + self.pending[p],
                desired=self.target[p],
                accelerator=self.acc[p],
                pools={self.sim.acc_names[a]: n for a, n in self.pool_target[p].items()},
                queue_depth=float(len(self.queue[p])) if p else 0.0,
                in_flight=float(len(self.queue[p]) + self.busy[p] + self.handing[p]),
                busy=(self.busy_int[p] - busy_old[1][p]) / busy_span if busy_span > 0 else None,
                service_time_s=(self.comp_s[p] - old[3][p]) / done if done else None,
                throughput_rps=done / span if span > 0 else None,
            )
        seen = sum(self.mix_n)
        mix = tuple((self.sim.shapes[i], n / seen) for i, n in enumerate(self.mix_n) if n)
        return Snapshot(
            now=t,
            stages=stages,
            arrival_rps=(self.arrived - old[4]) / span if span > 0 else None,
            mix=mix,
            waiting=float(len(self.queue[0])),
            slo_attainment=self.slo_met / len(self.slo_q) if self.slo_q else None,
            metrics_age_s=0.0,
        )

    def _warm_snapshot(self) -> Snapshot:
        """t = 0: the planner's pool for the first minutes' load, at steady state."""
        sim = self.sim
        rate, mix = initial_load(
            [
                TraceRequest(t, sim.shapes[k])
                for t, k in zip(sim.arrivals[:5000], sim.shape_of, strict=False)
            ]
        )
        if sim.mono:
            return Snapshot(now=0.0, stages={}, arrival_rps=rate, mix=mix)
        sizes = warm_sizes(sim.profile, rate, mix or ((sim.profile.default_request, 1.0),), sim.cfg)
        stages = {}
        for s, (n, acc) in sizes.items():
            t = sum(w * sim.profile.service_time(s, acc, shape) for shape, w in mix) if mix else 0.0
            stages[s] = StageObservation(
                ready=n,
                starting=0,
                desired=n,
                accelerator=acc,
                queue_depth=0.0,
                in_flight=rate * t,
                busy=rate * t,
                service_time_s=t or None,
                throughput_rps=rate,
            )
        return Snapshot(now=0.0, stages=stages, arrival_rps=rate, mix=mix, waiting=0.0)

    def _decide(self, snap: Snapshot, state: Any, ready: bool) -> Any:
        sim = self.sim
        decision = sim.policy.decide(snap, state, sim.profile, sim.knobs)
        for p, name in enumerate(sim.pools):
            d = decision.stages.get(name)
            if d is None:
                continue
            main = d.accelerator or self.acc[p]
            wanted = dict(d.pools) if d.pools else {main: d.replicas}
            sizes = {}
            for acc, n in wanted.items():
                stage_ok = sim.mono or acc in sim.profile.stages[name]
                if acc not in sim.acc_names or not stage_ok:
                    raise SimulationError(f"policy {sim.policy.name}: {name} cannot run on {acc!r}")
                sizes[sim.acc_names.index(acc)] = max(0, int(n))
            if main not in sim.acc_names:
                raise SimulationError(f"policy {sim.policy.name}: {name} cannot run on {main!r}")
            main_i = sim.acc_names.index(main)
            held = {a: n for a, n in sizes.items() if n}
            if held != self.pool_target[p] or main_i != self.acc_i[p]:
                self.scale_events += not ready
                self._scale(p, sizes, main_i)
        self._schedule(ready)
        for p in range(len(sim.pools)):
            if self.idle[p] and self.queue[p]:  # left to faster instances that may be gone
                self._wake(p)
        if self.edf:
            self._set_deadlines()
        return decision.state

    # -- the loop ----------------------------------------------------------------------
    def go(self) -> SimResult:  # one hot loop, kept in one place for speed
        sim, cfg = self.sim, self.sim.cfg
        arrivals, n = sim.arrivals, len(sim.arrivals)
        hop = sim.profile.handoff_seconds
        last = len(sim.pools) - 1
        hops = 0.0 if sim.mono else hop * last
        slo_x = sim.slo_value if sim.slo_kind == "slowdown" else 0.0
        slo_s = sim.slo_value if sim.slo_kind == "seconds" else 0.0
        heap, queue, idle, heappush, heappop = (
            self.heap,
            self.queue,
            self.idle,
            heapq.heappush,
            heapq.heappop,
        )
        latencies: list[float] = []
        done_times: list[float] = []
        timeline: list[tuple[float, tuple[int, ...]]] = []
        rejected = met = 0
        sim.policy.prepare(sim.future())
        state = self._decide(self._warm_snapshot(), sim.policy.initial_state(), ready=True)
        if cfg.record:
            timeline.append((0.0, tuple(self._held(p) for p in range(last + 1))))
        self.samples.clear()
        self._snapshot(0.0)  # the first window starts here
        next_tick = sim.interval
        i = 0
        in_system = 0
        end = arrivals[-1] + DRAIN_LIMIT_S if n else 0.0
        inf = math.inf
        edf, max_batch = self.edf, sim.max_batch
        while i < n or in_system:
            t_ev = heap[0][0] if heap else inf
            t_arr = arrivals[i] if i < n else inf
            if t_ev <= t_arr and t_ev <= next_tick:
                t, kind, inst, r, st = heappop(heap)
                self.now = t
                if kind == _DONE:
                    p = self.i_pool[inst]
                    self.busy_int[p] += self.busy[p] * (t - self.busy_t[p])
                    self.busy_t[p] = t
                    self.busy[p] -= 1
                    served = (r,) if r >= 0 else self.batch_of[inst]  # r < 0: a batch call
                    self.comps[p] += len(served)
                    self.comp_s[p] += st
                    for r in served:
                        if p == last:
                            lat = t - arrivals[r]
                            ok = lat <= (slo_x * (self.unloaded[r] + hops) if slo_x else slo_s)
                            latencies.append(lat)
                            met += ok
                            self.slo_q.append((t, ok))
                            self.slo_met += ok
                            in_system -= 1
                            if cfg.record:
                                done_times.append(t)
                        else:
                            self.handing[p] += 1
                            heappush(heap, (t + hop, _HOP, p + 1, r, 0.0))
                    a = self.i_acc[inst]
                    self.busy_acc[p][a] -= 1
                    self.running[p].discard(inst)
                    if self.draining[p] and self.drain_acc[p].get(a):
                        self.drain_acc[p][a] -= 1
                        self.draining[p] -= 1
                        self._free(inst)
                        self._schedule()
                        if self.mixed[p]:  # one fewer fast instance to leave work to
                            self._wake(p)
                    elif self.mixed[p]:
                        self._serve_or_idle(p, inst)
                    elif queue[p]:
                        batch = queue[p].pop_batch(max_batch[p])
                        if len(batch) == 1:
                            self._start(p, inst, batch[0], t)
                        else:
                            self._start_batch(p, inst, batch, t)
                    else:
                        idle[p].append(inst)
                elif kind == _HOP:
                    p = inst
                    self.handing[p - 1] -= 1
                    if idle[p] and not queue[p] and not self.mixed[p]:
                        self._start(p, idle[p].pop(), r, t)
                    else:
                        key = sim.shape_of[r] if max_batch[p] > 1 else None
                        deadline = self.deadline[r] if edf else None
                        queue[p].push(r, arrival=t, deadline=deadline, key=key)
                        if idle[p]:  # a mixed pool: the fastest idle one, unless a faster
                            self._wake(p)  # busy one is expected to finish it first
                elif self.i_state[inst] == 0:  # _READY, unless removed while starting
                    p = self.i_pool[inst]
                    self.i_state[inst] = 1
                    self.starting[p].remove(inst)
                    self._serve_or_idle(p, inst)
            elif t_arr <= next_tick:
                t = self.now = t_arr
                r = i
                i += 1
                self.arrived += 1
                self.mix_q.append((t, sim.shape_of[r]))
                self.mix_n[sim.shape_of[r]] += 1
                if sum(map(len, queue)) >= cfg.max_queue:
                    rejected += 1
                    self.slo_q.append((t, 0))
                    continue
                in_system += 1
                if edf:
                    self.deadline[r] = t + self.deadline_after[sim.shape_of[r]]
                if idle[0] and not queue[0] and not self.mixed[0]:
                    self._start(0, idle[0].pop(), r, t)
                else:
                    key = sim.shape_of[r] if max_batch[0] > 1 else None
                    deadline = self.deadline[r] if edf else None
                    queue[0].push(r, arrival=t, deadline=deadline, key=key)
                    if idle[0]:
                        self._wake(0)
            else:
                if next_tick > end:
                    break
                t = self.now = next_tick
                next_tick += sim.interval
                state = self._decide(self._snapshot(t), state, ready=False)
                if cfg.record:
                    timeline.append((t, tuple(self._held(p) for p in range(last + 1))))
        self._account(self.now)
        duration = max(self.now, arrivals[-1] if n else 0.0)
        return SimResult(
            policy=sim.policy.name,
            pools=sim.pools,
            requests=n,
            completed=len(latencies),
            rejected=rejected,
            unfinished=in_system,
            duration_s=duration,
            latencies=latencies,
            met=met,
            gpu_hours=self.gpu_s / 3600.0,
            cost_usd=self.cost,
            scale_events=self.scale_events,
            timeline=timeline,
            done_times=done_times,
        )

    def _held(self, p: int) -> int:
        """Instances holding GPUs in pool p: starting, up and draining."""
        return len(self.starting[p]) + len(self.idle[p]) + self.busy[p]


def simulate(
    profile: Profile,
    requests: Sequence[TraceRequest],
    policy: Policy,
    cfg: SimConfig,
    knobs: Knobs | None = None,
) -> SimResult:
    """Run `policy` over `requests`; the knobs default to the budget and SLO of `cfg`."""
    knobs = knobs or Knobs(slo=cfg.slo, max_gpus=cfg.gpus)
    return Simulator(profile, requests, policy, knobs, cfg).run()


def timeline_of(result: SimResult) -> Mapping[str, list[tuple[float, int]]]:
    """Per pool, (time, instances) points of the recorded timeline."""
    return {
        name: [(t, counts[p]) for t, counts in result.timeline]
        for p, name in enumerate(result.pools)
    }
