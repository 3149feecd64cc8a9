"""`disagfusion bench`: throughput and latency of async, sync and monolithic serving."""

from __future__ import annotations

import argparse
from typing import Any

from disagfusion.cli.common import (
    HELP,
    require_extra,
)


def register(sub: Any) -> None:
    """Add `bench` to the `disagfusion` parser."""
    b = sub.add_parser(
        "bench", help="throughput/latency: async vs sync vs monolithic", formatter_class=HELP
    )
    from disagfusion.worker.local.bench import add_bench_args

    add_bench_args(b)
    b.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    require_extra("worker")
    from disagfusion.worker.local.bench import run_bench_command

    return run_bench_command(args)
