"""`disagfusion operator`: run the kopf operator against the current cluster.

kopf logs in with the kubernetes client's own logic (in-cluster service
account first, then the current kubeconfig context); our Kube client loads
the same configuration in the startup handler.
"""

from __future__ import annotations

import asyncio
import logging
import os

from disagfusion.operator.handlers import DEFAULT_TIMER_INTERVAL_S, build_registry

log = logging.getLogger(__name__)


def run_operator(
    namespaces: list[str],
    all_namespaces: bool,
    metrics_port: int = 8080,
    timer_interval: float = DEFAULT_TIMER_INTERVAL_S,
    liveness_port: int | None = None,
    prometheus_url: str | None = None,
) -> int:
    """`prometheus_url` None: $DISAGFUSION_PROMETHEUS_URL (the chart's prometheus.url)."""
    import kopf
    from prometheus_client import start_http_server

    if metrics_port:
        start_http_server(metrics_port)
        log.info("operator metrics on :%d/metrics", metrics_port)
    url = prometheus_url or os.environ.get("DISAGFUSION_PROMETHEUS_URL") or None
    log.info("autoscaler queries %s", url or "no Prometheus (only spec.autoscaling.prometheusUrl)")
    registry = build_registry(timer_interval=timer_interval, prometheus_url=url)
    liveness = f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=all_namespaces,
            namespaces=namespaces,
            standalone=True,
            liveness_endpoint=liveness,
        )
    )
    return 0
