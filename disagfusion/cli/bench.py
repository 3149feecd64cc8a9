"""`disagfusion bench`: throughput and latency of async, sync and monolithic serving;
`disagfusion bench transport`: tensor transfer speed per transport backend."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from disagfusion.cli.common import (
    HELP,
    add_transport_args,
    one_line_errors,
    require_extra,
    transport_settings,
)


def register(sub: Any) -> None:
    """Add `bench` (and its `transport` mode) to the `disagfusion` parser."""
    from disagfusion.worker.local import bench as serving
    from disagfusion.worker.local import bench_transport

    b = sub.add_parser(
        "bench",
        help="throughput/latency: async (per batch setting) vs sync vs monolithic",
        description=serving.__doc__,
        formatter_class=HELP,
    )
    serving.add_bench_args(b)
    add_transport_args(b)
    b.set_defaults(func=_cmd_bench)
    # Optional, so that plain `disagfusion bench [flags]` stays the serving benchmark.
    modes = b.add_subparsers(
        dest="bench_mode",
        metavar="[transport]",
        required=False,
        help="a mode instead of the serving benchmark (see its --help)",
    )
    t = modes.add_parser(
        "transport",
        help="tensor transfer speed per transport backend vs a raw TCP socket",
        description=bench_transport.__doc__,
        formatter_class=HELP,
    )
    bench_transport.add_transport_args(t)
    one_line_errors(t)
    t.set_defaults(func=_cmd_bench_transport)


def _cmd_bench(args: argparse.Namespace) -> int:
    require_extra("worker")
    from disagfusion.worker.local.bench import run_bench_command

    transport_settings(args)  # an unknown option fails before any server starts
    return run_bench_command(args)


def _cmd_bench_transport(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("torch") is None:  # every backend needs it (the baseline not)
        raise ModuleNotFoundError("No module named 'torch'", name="torch")
    from disagfusion.worker.local.bench_transport import run_transport_command

    return run_transport_command(args)
