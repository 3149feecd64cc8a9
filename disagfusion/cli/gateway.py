"""`disagfusion gateway`: the HTTP/gRPC gateway alone."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from disagfusion.cli.common import (
    HELP,
    add_handoff_args,
    add_job_store_args,
    add_model_args,
    add_served_name,
    add_transport_args,
    handoff_delay,
    non_negative_float,
    port,
    positive_float,
    positive_int,
    require_extra,
    transport_settings,
)
from disagfusion.cli.worker import add_tls_args, tls_settings
from disagfusion.worker.gateway.limits import add_limit_arguments, limits_from_args
from disagfusion.worker.params import DEFAULT_MAX_IMAGES, STAGES


def register(sub: Any) -> None:
    """Add `gateway` to the `disagfusion` parser."""
    g = sub.add_parser("gateway", help="run the HTTP/gRPC gateway alone", formatter_class=HELP)
    add_model_args(g)
    add_served_name(g)
    g.add_argument("--port", type=port, default=8000, help="HTTP port (OpenAI API)")
    g.add_argument(
        "--grpc-port", type=port, required=True, help="gRPC port of clients (Gateway.Generate)"
    )
    g.add_argument(
        "--result-port",
        type=port,
        default=None,
        help="gRPC port the stages deliver results to (the Stage service, never served on"
        " --grpc-port); default: --grpc-port + 1",
    )
    g.add_argument(
        "--topology",
        required=True,
        help='JSON {"encoder": [addr...], "denoiser": [...], "decoder": [...]} or @file',
    )
    g.add_argument("--host", default="127.0.0.1", help="address to listen on")
    g.add_argument(
        "--advertise-host", default="127.0.0.1", help="host the workers use to send results back"
    )
    g.add_argument("--pipeline", default="local", help="pipeline name (metrics label)")
    g.add_argument(
        "--max-queue",
        type=positive_int,
        default=32,
        help="accepted requests waiting for the first stage before 429",
    )
    g.add_argument(
        "--max-pending",
        type=positive_int,
        default=512,
        help="accepted, unanswered requests before 429",
    )
    g.add_argument(
        "--request-timeout",
        type=positive_float,
        default=300.0,
        help="seconds before an accepted request is answered 504",
    )
    g.add_argument(
        "--max-images",
        type=positive_int,
        default=DEFAULT_MAX_IMAGES,
        help="largest n in one request (the stage workers' --max-images must be as large)",
    )
    g.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=60.0,
        help="on SIGTERM: seconds to finish accepted requests before answering them 503",
    )
    add_job_store_args(g)
    g.add_argument(
        "--video-timeout",
        type=positive_float,
        default=3600.0,
        help="seconds a video job may run before it fails",
    )
    g.add_argument(
        "--slo",
        type=_slo,
        default=None,
        help="stamp each request with this SLO's deadline ('30s', or '3x' its predicted"
        " unloaded time): the order stages with --queue-order edf serve in",
    )
    add_handoff_args(g)
    add_transport_args(g)
    add_tls_args(
        g, "--result-port and every channel to the stages (the client ports stay plaintext)"
    )
    add_limit_arguments(g)
    g.set_defaults(func=_cmd_gateway)


def _slo(text: str) -> str:
    from disagfusion.scheduling.profile import parse_slo

    try:
        parse_slo(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _cmd_gateway(args: argparse.Namespace) -> int:
    require_extra("worker")
    from disagfusion.worker.gateway.serve import GatewayOptions, run_gateway

    try:
        topology = parse_topology(args.topology)
    except ValueError as err:
        print(f"error: --topology: {err}", file=sys.stderr)
        return 2
    try:
        result_port = resolve_result_port(args.grpc_port, args.result_port, args.port)
    except ValueError as err:
        print(f"error: --result-port: {err}", file=sys.stderr)
        return 2
    try:
        http_limits = limits_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    transport, transport_options = transport_settings(args)
    tls = tls_settings(args, transport)
    return asyncio.run(
        run_gateway(
            GatewayOptions(
                model=args.model,
                family=args.family,
                port=args.port,
                grpc_port=args.grpc_port,
                result_port=result_port,
                stage_addrs=topology,
                host=args.host,
                advertise_host=args.advertise_host,
                pipeline=args.pipeline,
                max_waiting=args.max_queue,
                max_pending=args.max_pending,
                request_timeout_s=args.request_timeout,
                max_images=args.max_images,
                api_key=os.environ.get("DISAGFUSION_API_KEY") or None,
                handoff_delay=handoff_delay(args),
                served_model_name=args.served_model_name,
                drain_timeout_s=args.drain_timeout,
                data_dir=args.data_dir or "",
                job_store=args.job_store or "",
                video_retention_s=args.video_retention,
                video_timeout_s=args.video_timeout,
                slo=args.slo,
                transport=transport,
                transport_options=transport_options,
                tls=tls,
                http_limits=http_limits,
            )
        )
    )


def resolve_result_port(grpc_port: int, result_port: int | None, http_port: int) -> int:
    """`--result-port`, by default `--grpc-port` + 1; ValueError when it clashes."""
    if result_port is None:
        if grpc_port == 65535:
            raise ValueError("--grpc-port is 65535, so there is no default: set --result-port")
        result_port = grpc_port + 1
    for name, other in (("--grpc-port", grpc_port), ("--port", http_port)):
        if result_port == other:
            raise ValueError(f"{result_port} is also {name}; the result port needs its own")
    return result_port


def parse_topology(text: str) -> dict[str, list[str]]:
    """`--topology`: JSON (or @file) naming every stage's gRPC addresses; ValueError says
    what is wrong."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as err:
            raise ValueError(f"cannot read {text[1:]}: {err.strerror or err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at character {err.pos})") from None
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object like {"encoder": ["host:port"], ...}')
    wanted = ["monolithic"] if "monolithic" in data else list(STAGES)
    unknown = sorted(set(data) - set(wanted))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; expected {', '.join(wanted)}")
    for stage in wanted:
        addrs = data.get(stage)
        if not isinstance(addrs, list) or not addrs:
            raise ValueError(f"{stage}: expected a non-empty list of host:port addresses")
        for addr in addrs:
            if not isinstance(addr, str) or not _is_host_port(addr):
                raise ValueError(f"{stage}: {addr!r} is not a host:port address")
    return {stage: list(data[stage]) for stage in wanted}


def _is_host_port(addr: str) -> bool:
    host, _, number = addr.rpartition(":")
    return bool(host) and number.isdigit() and 1 <= int(number) <= 65535
