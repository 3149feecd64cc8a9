"""Local autoscaling: `serve --local --autoscale` sizes its own worker processes.

Every interval the loop scrapes each running process's /readyz and /metrics,
differences the counters against the previous scrape (rates over the
interval), builds the same `Snapshot` the operator builds from Prometheus,
asks the same policy, and adds or removes local processes to reach the
decision. Each local worker counts as one "GPU" of the budget. Removal is a
SIGTERM: the worker drains (finishes and hands off what it holds) then exits.

Parsing and snapshot building are pure functions of the scraped text, so
they are tested without processes; only `scrape` does I/O.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client.parser import text_string_to_metric_families

from disagfusion.scheduling.profile import Profile, RequestShape, parse_profile
from disagfusion.scheduling.scaling import Decision, Knobs, Policy, Snapshot, StageObservation
from disagfusion.scheduling.stages import STAGES

log = logging.getLogger(__name__)

_P128 = 128 * 128 / 1e6
# builtin:tiny-unet on one CPU thread, measured roughly: denoiser ~0.22 s at 128x128 and
# 10 steps, encoder ~0.02 s, decoder ~0.03 s at 128x128. Rough on purpose: the policy's
# observed/predicted feedback corrects it for the machine it runs on.
LOCAL_PROFILE: dict[str, Any] = {
    "name": "local-cpu-tiny",
    "description": "builtin:tiny-unet, one CPU thread per worker process (rough)",
    "source": "measured by hand on a 2-core machine; corrected at runtime by feedback",
    "accelerators": [{"name": "cpu", "cost_per_hour": 0.0, "memory_gb": 1}],
    "startup_seconds": 10,
    "handoff_seconds": 0.005,
    "default_request": {"width": 64, "height": 64, "frames": 1, "steps": 10},
    "defaults": {"gpus": 6, "slo": "2x"},
    "stages": {
        "encoder": {"cpu": {"a": 0.02}},
        "denoiser": {"cpu": {"c": round(0.22 / (_P128 * 10), 4)}},
        "decoder": {"cpu": {"b": round(0.03 / _P128, 4)}},
    },
}


_SIZE_CHANGE = re.compile(r"^(up|down) \d+->\d+: ")


def local_profile() -> Profile:
    return parse_profile(LOCAL_PROFILE)


def local_knobs(max_workers: int, interval_s: float) -> Knobs:
    """Knobs for processes on one machine: a worker starts in seconds, not minutes."""
    return Knobs(
        interval_s=interval_s,
        max_gpus=max_workers,
        max_replicas={s: max_workers - (len(STAGES) - 1) for s in STAGES},
        scale_down_window_s=30.0,
        stale_after_s=3 * interval_s,
        drain_seconds=15.0,
    )


# ---- pure: text -> totals -> snapshot ----------------------------------------------


@dataclass(frozen=True)
class ProcessMetrics:
    """One process's metrics at one scrape: gauges as read, counters as running totals."""

    queue_depth: float = 0.0
    in_flight: float = 0.0
    busy: float = 0.0
    service_sum: float = 0.0
    service_count: float = 0.0
    completed: float = 0.0
    waiting: float = 0.0  # gateway only
    arrivals: Mapping[RequestShape, float] = field(default_factory=dict)  # gateway only


_SUMMED = {
    "disagfusion_stage_queue_depth": "queue_depth",
    "disagfusion_stage_in_flight": "in_flight",
    "disagfusion_stage_busy": "busy",
    "disagfusion_stage_service_time_seconds_sum": "service_sum",
    "disagfusion_stage_service_time_seconds_count": "service_count",
    "disagfusion_stage_requests_completed_total": "completed",
    "disagfusion_gateway_waiting_requests": "waiting",
}


def parse_metrics(text: str) -> ProcessMetrics:
    """The values the autoscaler reads from a /metrics page (Prometheus text format)."""
    sums = dict.fromkeys(_SUMMED.values(), 0.0)
    arrivals: dict[RequestShape, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in _SUMMED:
                sums[_SUMMED[s.name]] += s.value
            elif s.name == "disagfusion_gateway_arrivals_total":
                shape = RequestShape(
                    width=int(s.labels["width"]),
                    height=int(s.labels["height"]),
                    frames=int(s.labels["frames"]),
                    steps=int(s.labels["steps"]),
                )
                arrivals[shape] = arrivals.get(shape, 0.0) + s.value
    return ProcessMetrics(**sums, arrivals=arrivals)


@dataclass(frozen=True)
class ProcessSample:
    key: str  # name and pid: counters are differenced only within one process
    role: str  # "gateway" or a stage
    ready: bool
    metrics: ProcessMetrics | None  # None: not scraped (still starting)


@dataclass(frozen=True)
class Observation:
    """Everything one scrape saw, plus the sizes currently asked for."""

    now: float
    processes: tuple[ProcessSample, ...]
    desired: Mapping[str, int]


def _delta(cur: float, prev: float) -> float:
    return cur if cur < prev else cur - prev  # a counter that went down was reset


def build_snapshot(prev: Observation | None, cur: Observation) -> Snapshot:
    """The policy's view: gauges from `cur`, rates from the counters' change since `prev`.

    Without a previous scrape there are no rates: `arrival_rps` is None, so a
    policy holds. Processes not present in both scrapes add to gauges only.
    """
    dt = cur.now - prev.now if prev is not None else 0.0
    before = {p.key: p.metrics for p in prev.processes} if prev is not None else {}
    stages: dict[str, StageObservation] = {}
    for stage, desired in cur.desired.items():
        procs = [p for p in cur.processes if p.role == stage]
        scraped = [p.metrics for p in procs if p.metrics is not None]
        pairs = [
            (m, old)
            for p in procs
            if (m := p.metrics) is not None and (old := before.get(p.key)) is not None
        ]
        d_sum = sum(_delta(m.service_sum, o.service_sum) for m, o in pairs)
        d_count = sum(_delta(m.service_count, o.service_count) for m, o in pairs)
        d_done = sum(_delta(m.completed, o.completed) for m, o in pairs)
        rated = dt > 0 and bool(pairs)
        stages[stage] = StageObservation(
            ready=sum(1 for p in procs if p.ready),
            starting=sum(1 for p in procs if not p.ready),
            desired=desired,
            queue_depth=sum(m.queue_depth for m in scraped) if scraped else None,
            in_flight=sum(m.in_flight for m in scraped) if scraped else None,
            # compute seconds per second: the mean number of busy instances over the window
            busy=d_sum / dt if rated else None,
            service_time_s=d_sum / d_count if d_count > 0 else None,
            throughput_rps=d_done / dt if rated else None,
        )
    gateway = next((p for p in cur.processes if p.role == "gateway"), None)
    old_gw = before.get(gateway.key) if gateway is not None else None
    arrival_rps: float | None = None
    mix: tuple[tuple[RequestShape, float], ...] = ()
    if gateway is not None and gateway.metrics is not None and old_gw is not None and dt > 0:
        new = {
            shape: _delta(n, old_gw.arrivals.get(shape, 0.0))
            for shape, n in gateway.metrics.arrivals.items()
        }
        arrival_rps = sum(new.values()) / dt
        mix = tuple(sorted((s, n) for s, n in new.items() if n > 0))
    return Snapshot(
        now=cur.now,
        stages=stages,
        arrival_rps=arrival_rps,
        mix=mix,
        waiting=gateway.metrics.waiting if gateway and gateway.metrics else None,
        metrics_age_s=0.0 if gateway is not None and gateway.metrics is not None else None,
    )


# ---- the cluster side ----------------------------------------------------------------


class ElasticCluster(Protocol):
    """What the loop needs of a LocalCluster (tests pass a fake)."""

    @property
    def workers(self) -> dict[str, list[Any]]: ...

    @property
    def gateway(self) -> Any: ...

    def add_worker(self, role: str) -> Any: ...

    def remove_worker(self, role: str) -> Any: ...


def apply_decision(
    cluster: ElasticCluster, wanted: Mapping[str, int], max_workers: int
) -> list[tuple[str, int, int]]:
    """Add and remove processes towards `wanted`: never below 1 per stage, never above
    `max_workers` in all. Removals go first, so their budget can go to the additions.
    Returns (stage, before, after) per stage that changed."""
    counts = {s: len(cluster.workers[s]) for s in wanted}
    changed: dict[str, int] = {}
    for stage, n in wanted.items():
        while counts[stage] > max(1, n):
            cluster.remove_worker(stage)
            changed.setdefault(stage, counts[stage])
            counts[stage] -= 1
    for stage, n in wanted.items():
        while counts[stage] < n and sum(counts.values()) < max_workers:
            try:
                cluster.add_worker(stage)
            except RuntimeError as err:  # no free slot or port: try again next round
                log.warning("cannot add a %s: %s", stage, err)
                break
            changed.setdefault(stage, counts[stage])
            counts[stage] += 1
    return [(s, before, counts[s]) for s, before in changed.items() if counts[s] != before]


class ScrapeError(RuntimeError):
    pass


def _get(url: str, timeout_s: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), ""


def scrape(cluster: ElasticCluster, now: float, timeout_s: float = 2.0) -> Observation:
    """Read /readyz and /metrics of every running process. A ready process (or the
    gateway) whose metrics cannot be read raises ScrapeError: the loop holds."""
    samples = []
    procs = [(c, c.role) for s in STAGES for c in list(cluster.workers.get(s, []))]
    if cluster.gateway is not None:
        procs.append((cluster.gateway, "gateway"))
    for child, role in procs:
        pid = child.proc.pid if getattr(child, "proc", None) is not None else 0
        try:
            ready = _get(child.http_url + "/readyz", timeout_s)[0] == 200
        except (OSError, urllib.error.URLError):
            ready = False
        metrics = None
        try:
            code, text = _get(child.http_url + "/metrics", timeout_s)
            metrics = parse_metrics(text) if code == 200 else None
        except (OSError, urllib.error.URLError, ValueError) as err:
            if ready or role == "gateway":
                raise ScrapeError(f"{child.name}: {err}") from err
        if metrics is None and (ready or role == "gateway"):
            raise ScrapeError(f"{child.name}: no metrics")
        samples.append(ProcessSample(f"{child.name}@{pid}", role, ready, metrics))
    desired = {s: len(cluster.workers[s]) for s in STAGES}
    return Observation(now=now, processes=tuple(samples), desired=desired)


class Autoscaler:
    """Scrape → snapshot → policy → add/remove processes, once per `step`
    (`serve --local` calls `safe_step` every interval from its supervision loop)."""

    def __init__(
        self,
        cluster: ElasticCluster,
        policy: Policy,
        profile: Profile,
        knobs: Knobs,
        max_workers: int,
        report: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cluster = cluster
        self.policy = policy
        self.profile = profile
        self.knobs = knobs
        self.max_workers = max_workers
        self.report = report
        self.clock = clock
        self.state = policy.initial_state()
        self.previous: Observation | None = None
        self.last_decision: Decision | None = None

    def step(self) -> list[tuple[str, int, int]]:
        try:
            obs = scrape(self.cluster, self.clock())
        except ScrapeError as err:
            log.warning("autoscale: holding, metrics unavailable (%s)", err)
            self.previous = None  # rates across the gap would mix two windows
            return []
        snapshot = build_snapshot(self.previous, obs)
        self.previous = obs
        if snapshot.arrival_rps is None:
            return []  # first scrape: no rates yet
        decision = self.policy.decide(snapshot, self.state, self.profile, self.knobs)
        self.state, self.last_decision = decision.state, decision
        if not decision.metrics_ok:
            return []
        actions = apply_decision(self.cluster, decision.replicas(), self.max_workers)
        for stage, before, after in actions:
            # The policy's reason starts with the same "up 1->2: " the line already shows.
            why = _SIZE_CHANGE.sub("", decision.stages[stage].reason)
            self.report(
                f"autoscale: {stage} {before} -> {after}: {why}"
                f" (arrivals {snapshot.arrival_rps:.2f}/s)"
            )
        return actions

    def safe_step(self) -> None:
        try:
            self.step()
        except Exception:  # one bad round must not end autoscaling, nor the server
            log.exception("autoscale step failed; holding")
