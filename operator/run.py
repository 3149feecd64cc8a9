"""`disagfusion operator`: run the kopf operator against the current cluster.

kopf logs in with the kubernetes client's own logic (kopf's fallback login
handler `login_via_client`: in-cluster service account first, then the
current kubeconfig context, whatever that supports: tokens, client
certificates, exec plugins); our Kube client loads the same configuration in
the startup handler. Without any usable configuration the command says so in
one line and exits, rather than letting kopf retry a failed login forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping

from disagfusion.operator.handlers import DEFAULT_TIMER_INTERVAL_S, build_registry
from disagfusion.operator.spec import DEFAULT_IMAGE, SpecDefaults, SpecError, parse_peers

log = logging.getLogger(__name__)


class NoClusterConfig(RuntimeError):
    """Neither an in-cluster service account nor a usable kubeconfig."""


def check_cluster_config() -> None:
    """Load the configuration kopf will log in with; NoClusterConfig says why not."""
    from kubernetes import config

    try:
        config.load_incluster_config()
        return
    except config.ConfigException:
        pass
    try:
        config.load_kube_config()
    except (config.ConfigException, OSError, ValueError) as err:
        where = os.environ.get("KUBECONFIG") or "~/.kube/config"
        raise NoClusterConfig(
            f"no Kubernetes configuration: not in a cluster and {where} is unusable ({err});"
            " set KUBECONFIG or run in a cluster"
        ) from None


class BadInstallation(ValueError):
    """An environment variable the chart sets holds something the operator cannot use."""


def spec_defaults_from_env(env: Mapping[str, str]) -> SpecDefaults:
    """What pipelines get where their spec does not say, from the chart's variables:
    DISAGFUSION_WORKER_IMAGE, and DISAGFUSION_METRICS_FROM / DISAGFUSION_PROBES_FROM
    (JSON lists of NetworkPolicyPeers: networkPolicy.metricsFrom and .probesFrom)."""
    peers = {}
    for key in ("DISAGFUSION_METRICS_FROM", "DISAGFUSION_PROBES_FROM"):
        try:
            peers[key] = parse_peers(json.loads(env.get(key) or "[]"), key)
        except json.JSONDecodeError as err:
            raise BadInstallation(f"{key} is not JSON: {err}") from None
        except SpecError as err:
            raise BadInstallation(f"{key}: {err}") from None
    return SpecDefaults(
        image=env.get("DISAGFUSION_WORKER_IMAGE") or DEFAULT_IMAGE,
        metrics_from=peers["DISAGFUSION_METRICS_FROM"],
        probes_from=peers["DISAGFUSION_PROBES_FROM"],
    )


def run_operator(
    namespaces: list[str],
    all_namespaces: bool,
    metrics_port: int = 8080,
    timer_interval: float = DEFAULT_TIMER_INTERVAL_S,
    liveness_port: int | None = None,
    prometheus_url: str | None = None,
) -> int:
    """`prometheus_url` None: $DISAGFUSION_PROMETHEUS_URL (the chart's prometheus.url).
    Raises NoClusterConfig or BadInstallation before starting anything."""
    import kopf
    from prometheus_client import start_http_server

    defaults = spec_defaults_from_env(os.environ)
    check_cluster_config()
    if metrics_port:
        start_http_server(metrics_port)
        log.info("operator metrics on :%d/metrics", metrics_port)
    url = prometheus_url or os.environ.get("DISAGFUSION_PROMETHEUS_URL") or None
    log.info("autoscaler queries %s", url or "no Prometheus (only spec.autoscaling.prometheusUrl)")
    log.info("pipelines without spec.image run %s", defaults.image)
    log.info(
        "stage workers' HTTP port admits %s by default, and %s",
        json.dumps(defaults.metrics_from) if defaults.metrics_from else "no metrics scraper",
        json.dumps(defaults.probes_from) if defaults.probes_from else "no extra probe source",
    )
    registry = build_registry(
        timer_interval=timer_interval, prometheus_url=url, spec_defaults=defaults
    )
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
