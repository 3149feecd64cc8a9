"""What `disagfusion bench` learns about the stages and decides from it.

- from the workers' /metrics: each role's compute time per request, its busy
  share of a measured interval and its mean batch (requests per pipeline call);
- `planned_counts`: processes per stage for a budget, as `disagfusion plan`
  splits GPUs (the max-min rule), from service times measured here.
"""

from __future__ import annotations

import math
import statistics
import urllib.request
from collections.abc import Mapping

from disagfusion.scheduling.planner import plan_for_gpus
from disagfusion.scheduling.profile import Accelerator, Profile, StageCost
from disagfusion.scheduling.stages import STAGES
from disagfusion.worker.local.launcher import LocalCluster

SERVICE_TIME = "disagfusion_stage_service_time_seconds"  # per request: a batch's share
BATCH_SIZE = "disagfusion_stage_batch_size"
Sums = dict[str, tuple[float, float]]  # histogram -> (sum, count) on one worker


def scrape_sums(url: str) -> Sums:
    """(sum, count) of every histogram on a worker's /metrics page."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        return parse_sums(resp.read().decode())


def parse_sums(text: str) -> Sums:
    """(sum, count) of every histogram (and summary) in Prometheus text format."""
    sums: dict[str, list[float]] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for index, suffix in enumerate(("_sum", "_count")):
            if not line.startswith("#") and name.endswith(suffix):
                entry = sums.setdefault(name.removesuffix(suffix), [0.0, 0.0])
                entry[index] = float(line.rsplit(" ", 1)[1])
    return {name: (total, count) for name, (total, count) in sums.items()}


def _delta(before: Sums, after: Sums, metric: str) -> tuple[float, float]:
    (s0, c0), (s1, c1) = before.get(metric, (0.0, 0.0)), after.get(metric, (0.0, 0.0))
    return s1 - s0, c1 - c0


def activity(
    before: Mapping[str, list[Sums]], after: Mapping[str, list[Sums]], wall_s: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Per role: (busy share of wall_s, mean over its instances; requests per call)."""
    busy, batch = {}, {}
    for role, ends in after.items():
        pairs = list(zip(before[role], ends, strict=True))
        computed = [_delta(b, a, SERVICE_TIME)[0] for b, a in pairs]
        busy[role] = round(statistics.fmean(computed) / wall_s, 3) if wall_s else 0.0
        calls = [_delta(b, a, BATCH_SIZE) for b, a in pairs]
        requests, count = sum(c[0] for c in calls), sum(c[1] for c in calls)
        if count:  # a role that computed nothing has no batch size
            batch[role] = round(requests / count, 2)
    return busy, batch


def mean_service_s(sums: list[Sums]) -> float:
    """Compute time per request, the mean over a role's instances."""
    means = [t / n if n else math.nan for t, n in (w.get(SERVICE_TIME, (0, 0)) for w in sums)]
    return statistics.fmean(means)


def scrape_all(cluster: LocalCluster) -> dict[str, list[Sums]]:
    return {role: [scrape_sums(c.http_url) for c in kids] for role, kids in cluster.workers.items()}


def planned_counts(service_s: Mapping[str, float], processes: int) -> dict[str, int]:
    """Processes per stage as `disagfusion plan` splits a budget: one process per
    "GPU", each stage costing its measured service time per request."""
    unmeasured = [s for s in STAGES if not 0 < service_s.get(s, math.nan) < math.inf]
    if unmeasured:
        raise ValueError(f"no service time measured for {', '.join(unmeasured)}")
    profile = Profile(
        name="measured here",
        accelerators=(Accelerator("cpu"),),
        stages={s: {"cpu": StageCost(a=service_s[s])} for s in STAGES},
    )
    plan = plan_for_gpus(profile, processes)
    return {s: p.replicas for s, p in plan.stages.items()}
