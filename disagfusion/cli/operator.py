"""`disagfusion operator`: the Kubernetes operator (kopf)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from disagfusion.cli.common import (
    HELP,
    port,
    require_extra,
)


def register(sub: Any) -> None:
    """Add `operator` to the `disagfusion` parser."""
    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf)", formatter_class=HELP)
    scope = op.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; default: default)",
    )
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    op.add_argument(
        "--metrics-port",
        type=int,
        default=8080,
        help="port of the operator's /metrics (0 turns it off)",
    )
    op.add_argument("--liveness-port", type=port, default=None, help="serve /healthz on this port")
    op.add_argument(
        "--prometheus-url",
        default=None,
        help="Prometheus the autoscaler queries (default $DISAGFUSION_PROMETHEUS_URL)",
    )
    op.set_defaults(func=_cmd_operator)


def _cmd_operator(args: argparse.Namespace) -> int:
    require_extra("operator")
    from disagfusion.operator.run import BadInstallation, NoClusterConfig, run_operator

    namespaces = args.namespace or ([] if args.all_namespaces else ["default"])
    try:
        return run_operator(
            namespaces,
            args.all_namespaces,
            args.metrics_port,
            liveness_port=args.liveness_port,
            prometheus_url=args.prometheus_url,
        )
    except (NoClusterConfig, BadInstallation) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
