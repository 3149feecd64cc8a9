"""Prometheus metrics of the operator itself (dashboards reference these names)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

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


def default_metrics() -> OperatorMetrics:
    """Metrics in the process-wide registry (what `disagfusion operator` serves)."""
    return OperatorMetrics(REGISTRY)
