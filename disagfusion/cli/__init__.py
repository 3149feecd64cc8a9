"""The `disagfusion` console script: one module per command group, each adding its
subcommand with `register(sub)` and its handler as `func`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from disagfusion.cli import bench, gateway, generate, operator, plan, serve, simulate, worker
from disagfusion.cli.common import HELP, extra_of, one_line_errors

COMMANDS = (worker, gateway, serve, generate, operator, bench, plan, simulate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagfusion", description=__doc__, formatter_class=HELP)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("DISAGFUSION_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"],
        help="log level ($DISAGFUSION_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    for each in (parser, *sub.choices.values()):
        one_line_errors(each)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional vision backends we never use.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {args.command}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    from disagfusion.worker.gateway.client import ClientError
    from disagfusion.worker.models import ModelSourceError

    try:
        return int(args.func(args))
    except (ClientError, ModelSourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        extra = extra_of(err.name or "")
        if extra is None:
            raise
        print(
            f"error: `disagfusion {args.command}` needs {err.name}, which this install lacks;"
            f" install the {extra} extra: pip install 'disagfusion[{extra}]'",
            file=sys.stderr,
        )
        return 2
