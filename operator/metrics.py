"""Prometheus metrics of the operator itself (dashboards reference these names)."""

from __future__ import annotations

import contextlib

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

RECONCILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class OperatorMetrics:
    """`disagfusion_operator_reconcile_*`; one registry per instance so tests do not clash."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.reconcile_total = Counter(
            "disagfusion_operator_reconcile_total",
            "Reconciliations of DiffusionPipelines by result (ok, invalid, error).",
            ["result"],
            registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "disagfusion_operator_reconcile_duration_seconds",
            "Time one reconciliation takes.",
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "disagfusion_operator_reconcile_errors_total",
            "Failed reconciliations by reason (invalid_spec, api_error, unexpected).",
            ["reason"],
            registry=self.registry,
        )
        self.scaling = ScalingMetrics(self.registry)


# Not "namespace": Prometheus sets that target label to the operator pod's namespace.
PIPELINE = ["pipeline_namespace", "pipeline"]
STAGE = [*PIPELINE, "stage"]


class ScalingMetrics:
    """`disagfusion_operator_*` about autoscaling decisions, per pipeline and stage."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(f"disagfusion_operator_{name}", doc, labels, registry=registry)

        self.current = gauge(
            "current_replicas", "Replicas a stage's StatefulSet asks for now.", STAGE
        )
        self.desired = gauge(
            "desired_replicas",
            "Replicas the autoscaler wants for a stage (Advisory: what it would set).",
            STAGE,
        )
        self.predicted = gauge(
            "predicted_replicas",
            "The performance model's balanced size of a stage, before feedback and limits.",
            STAGE,
        )
        self.predicted_service_time = gauge(
            "predicted_service_time_seconds",
            "The profile's mean compute seconds per request of a stage for the observed mix.",
            STAGE,
        )
        self.observed_service_time = gauge(
            "observed_service_time_seconds",
            "Observed mean compute seconds per request of a stage (Prometheus, rate window).",
            STAGE,
        )
        self.arrival_rate = gauge(
            "observed_arrival_rate",
            "Requests per second reaching the pipeline's gateway, as the autoscaler saw them.",
            PIPELINE,
        )
        self.metrics_available = gauge(
            "metrics_available",
            "1 when the autoscaler had fresh metrics for the pipeline, 0 when it held sizes.",
            PIPELINE,
        )
        self.decisions = Counter(
            "disagfusion_operator_scaling_decisions_total",
            "Decisions that changed a stage's size, by direction (up, down), reason class (load,"
            " budget, max; hold: back to the held size without fresh metrics) and whether they"
            " were applied (Active) or only advised.",
            [*STAGE, "direction", "reason", "applied"],
            registry=registry,
        )
        self.rounds = Counter(
            "disagfusion_operator_autoscale_rounds_total",
            "Autoscaler rounds by result (ok, no_metrics, no_profile, error).",
            ["result"],
            registry=registry,
        )

    def forget(self, namespace: str, pipeline: str) -> None:
        """Drop a pipeline's gauges (deleted, or autoscaling Disabled)."""
        for metric in (self.arrival_rate, self.metrics_available):
            _remove(metric, namespace, pipeline)
        for metric in (
            self.current,
            self.desired,
            self.predicted,
            self.predicted_service_time,
            self.observed_service_time,
        ):
            for stage in ("encoder", "denoiser", "decoder"):
                _remove(metric, namespace, pipeline, stage)


def _remove(metric: Gauge, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never set
        metric.remove(*labels)


def default_metrics() -> OperatorMetrics:
    """Metrics in the process-wide registry (what `disagfusion operator` serves)."""
    return OperatorMetrics(REGISTRY)
