"""What the autoscaler asks Prometheus about one pipeline, and the Snapshot it makes (pure).

The workers and the gateway label every series with `pipeline` (the pods run
with `--pipeline <name>`); the scrape adds `namespace` (PodMonitor and the
usual kubernetes_sd relabelling do). Rates use one window for all series.

Missing is not zero: a metric with no series gives None and the policy falls
back to its model. The exceptions are the NaN of an idle ratio (no
completions: no observed service time) and demand with the gateway up but no
request yet (zero arrivals), as in Dynamo's planner.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from disagfusion.scheduling.profile import STAGES, RequestShape
from disagfusion.scheduling.scaling import Snapshot, StageObservation

SHAPE_LABELS = ("width", "height", "frames", "steps")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def selector(pipeline: str, namespace: str | None) -> str:
    """The label matchers of one pipeline's series; no namespace matcher when None."""
    parts = [f"pipeline={_quote(pipeline)}"]
    if namespace is not None:
        parts.append(f"namespace={_quote(namespace)}")
    return ",".join(parts)


def queries(pipeline: str, namespace: str | None, window: str = "1m") -> dict[str, str]:
    """Key -> PromQL instant query for one pipeline."""
    sel = selector(pipeline, namespace)
    arrivals = f"rate(disagfusion_gateway_arrivals_total{{{sel}}}[{window}])"
    by_stage = "sum by (stage)"
    return {
        "arrivals": f"sum({arrivals})",
        "mix": f"sum by ({','.join(SHAPE_LABELS)}) ({arrivals})",
        "gateway": f"count(disagfusion_gateway_pending_requests{{{sel}}})",
        "waiting": f"sum(disagfusion_gateway_waiting_requests{{{sel}}})",
        "queue": f"{by_stage} (disagfusion_stage_queue_depth{{{sel}}})",
        "in_flight": f"{by_stage} (disagfusion_stage_in_flight{{{sel}}})",
        "busy": f"{by_stage} (avg_over_time(disagfusion_stage_busy{{{sel}}}[{window}]))",
        "service_time": (
            f"{by_stage} (rate(disagfusion_stage_service_time_seconds_sum{{{sel}}}[{window}]))"
            f" / {by_stage} (rate(disagfusion_stage_service_time_seconds_count{{{sel}}}"
            f"[{window}]))"
        ),
        "throughput": (
            f"{by_stage} (rate(disagfusion_stage_requests_completed_total{{{sel}}}[{window}]))"
        ),
        # The newest sample of any of the pipeline's processes: how fresh the view is.
        "newest": (
            "max(timestamp({__name__=~"
            f'"disagfusion_stage_ready|disagfusion_gateway_pending_requests",{sel}}}))'
        ),
    }


def _number(raw: Any) -> float | None:
    """A sample's value; None for NaN, infinities and garbage."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def samples(data: Mapping[str, Any] | None) -> list[tuple[dict[str, str], float | None, float]]:
    """(labels, value, evaluation time) of each sample of an instant-vector answer."""
    if not data or data.get("resultType") not in ("vector", "scalar"):
        return []
    result = data.get("result") or []
    if data.get("resultType") == "scalar":
        result = [{"metric": {}, "value": result}]
    out = []
    for item in result:
        value = item.get("value") or [0, "NaN"]
        out.append((dict(item.get("metric") or {}), _number(value[1]), float(value[0])))
    return out


def scalar(data: Mapping[str, Any] | None) -> float | None:
    """The value of a one-sample answer (a sum without `by`); None when empty or NaN."""
    found = samples(data)
    return found[0][1] if found else None


def per_stage(data: Mapping[str, Any] | None) -> dict[str, float | None]:
    return {labels.get("stage", ""): value for labels, value, _ in samples(data)}


def mix(data: Mapping[str, Any] | None) -> tuple[tuple[RequestShape, float], ...]:
    """Request shapes with a positive arrival rate, largest share first."""
    out = []
    for labels, value, _ in samples(data):
        if value is None or value <= 0:
            continue
        try:
            shape = RequestShape(*(int(labels[k]) for k in SHAPE_LABELS))
        except (KeyError, ValueError):
            continue  # a series without the shape labels cannot be sized
        out.append((shape, value))
    return tuple(sorted(out, key=lambda item: (-item[1], item[0])))


def metrics_age(data: Mapping[str, Any] | None) -> float | None:
    """Seconds between the newest sample and the query's evaluation; None: no sample at all."""
    found = [(value, at) for _, value, at in samples(data) if value is not None]
    if not found:
        return None
    newest, at = max(found)
    return max(0.0, at - newest)


def stage_sizes(sts: Mapping[str, Any] | None, fallback: int) -> tuple[int, int]:
    """(replicas asked for, ready) of a StatefulSet; the fallback size when it does not exist."""
    if sts is None:
        return fallback, 0
    desired = (sts.get("spec") or {}).get("replicas")
    ready = (sts.get("status") or {}).get("readyReplicas") or 0
    return (fallback if desired is None else int(desired)), int(ready)


def build_snapshot(
    results: Mapping[str, Mapping[str, Any]] | None,
    statefulsets: Mapping[str, Mapping[str, Any] | None],
    now: float,
    accelerators: Mapping[str, str] | None = None,
    fallback_replicas: Mapping[str, int] | None = None,
    pools: Mapping[str, Mapping[str, int]] | None = None,
) -> Snapshot:
    """A Snapshot from the answers to `queries()` and the stages' StatefulSets.

    `results` None means Prometheus could not be asked: sizes only, metrics_age_s None.
    `pools`: a pooled stage's replicas per accelerator (its StatefulSets' sizes).
    """
    accelerators = accelerators or {}
    fallback_replicas = fallback_replicas or {}
    res = results or {}
    per = {key: per_stage(res.get(key)) for key in ("queue", "in_flight", "busy", "throughput")}
    service = per_stage(res.get("service_time"))
    stages = {}
    for stage in STAGES:
        desired, ready = stage_sizes(statefulsets.get(stage), fallback_replicas.get(stage, 0))
        seen = any(stage in values for values in per.values())
        stages[stage] = StageObservation(
            ready=ready,
            starting=max(0, desired - ready),
            desired=desired,
            accelerator=accelerators.get(stage, ""),
            queue_depth=per["queue"].get(stage),
            in_flight=per["in_flight"].get(stage),
            busy=per["busy"].get(stage),
            service_time_s=service.get(stage),
            # A counter that exists and did not move is a real zero.
            throughput_rps=(per["throughput"].get(stage) or 0.0) if seen else None,
            pools=dict((pools or {}).get(stage) or {}),
        )
    gateway_up = bool(scalar(res.get("gateway")))
    arrivals = scalar(res.get("arrivals"))
    if arrivals is None and gateway_up:
        arrivals = 0.0  # the gateway is scraped but nobody asked yet
    return Snapshot(
        now=now,
        stages=stages,
        arrival_rps=arrivals,
        mix=mix(res.get("mix")),
        waiting=scalar(res.get("waiting")),
        metrics_age_s=metrics_age(res.get("newest")) if results is not None else None,
    )
