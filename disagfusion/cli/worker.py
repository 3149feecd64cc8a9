"""`disagfusion worker`: one stage worker, what a pod runs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from disagfusion.cli.common import (
    HELP,
    add_batching_args,
    add_handoff_args,
    add_model_args,
    add_transport_args,
    handoff_delay,
    non_negative_float,
    port,
    positive_int,
    require_extra,
    transport_settings,
)
from disagfusion.worker.params import DEFAULT_MAX_IMAGES, ROLES

if TYPE_CHECKING:
    from disagfusion.worker.security.tls import TlsConfig


def register(sub: Any) -> None:
    """Add `worker` to the `disagfusion` parser."""
    w = sub.add_parser(
        "worker", help="run one stage worker (what a pod runs)", formatter_class=HELP
    )
    w.add_argument(
        "--stage", "--role", dest="role", choices=ROLES, required=True, help="the stage to run"
    )
    add_model_args(w)
    w.add_argument("--port", type=port, required=True, help="gRPC port (Stage service)")
    w.add_argument(
        "--http-port", type=port, required=True, help="HTTP port: /healthz, /readyz, /metrics"
    )
    w.add_argument("--host", default="127.0.0.1", help="address to listen on")
    w.add_argument("--next", default="", help="comma-separated gRPC addresses of the next stage")
    w.add_argument("--pipeline", default="local", help="pipeline name (metrics label)")
    w.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    w.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: by device)"
    )
    w.add_argument(
        "--queue-capacity",
        type=positive_int,
        default=2,
        help="payloads waiting for compute before the worker refuses more",
    )
    w.add_argument(
        "--no-overlap",
        action="store_true",
        help="synchronous hand-off: receive, compute, send one request at a time",
    )
    w.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)"
    )
    w.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=120.0,
        help="seconds a SIGTERMed worker may spend finishing what it holds",
    )
    add_batching_args(w)
    w.add_argument(
        "--max-images",
        type=positive_int,
        default=DEFAULT_MAX_IMAGES,
        help="the gateway's --max-images: a payload declaring more bytes than a request of"
        " this many images at the model's largest size can need is refused unread",
    )
    w.add_argument(
        "--slowdown",
        type=_factor,
        default=1.0,
        help="emulate a slower accelerator: every call takes this many times its compute time",
    )
    add_handoff_args(w)
    add_transport_args(w)
    add_tls_args(w, "the Stage port and every channel to the next stage and the gateway")
    w.set_defaults(func=_cmd_worker)


def add_tls_args(p: argparse.ArgumentParser, where: str) -> None:
    """--tls-cert/--tls-key/--tls-ca (all three or none) and --tls-allow-plaintext-data."""
    g = p.add_argument_group(
        "mTLS between stages", f"all three files, or none (plaintext); with them: mTLS on {where}"
    )
    g.add_argument("--tls-cert", metavar="PEM", help="this process's certificate (chain)")
    g.add_argument("--tls-key", metavar="PEM", help="its private key, unencrypted")
    g.add_argument(
        "--tls-ca", metavar="PEM", help="the pipeline's CA: the only issuer peers are trusted by"
    )
    g.add_argument(
        "--tls-allow-plaintext-data",
        action="store_true",
        help="with mTLS, still allow --transport torch or nixl, whose tensor bytes bypass gRPC"
        " and are not encrypted (shm is allowed anyway: it never leaves the host)",
    )


def tls_settings(args: argparse.Namespace, transport: str) -> TlsConfig | None:
    """The TLS flags, loaded and checked against --transport; a bad combination or an
    unusable file prints one line and exits 2."""
    from disagfusion.worker.security.tls import TlsError, data_plane_problem, load_tls

    try:
        tls = load_tls(args.tls_cert, args.tls_key, args.tls_ca, args.tls_allow_plaintext_data)
        problem = data_plane_problem(transport, tls)
    except TlsError as err:
        problem = str(err)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return tls


def _factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 1 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def _cmd_worker(args: argparse.Namespace) -> int:
    require_extra("worker")
    from disagfusion.worker.runtime.serve import WorkerOptions, run_worker

    transport, transport_options = transport_settings(args)
    tls = tls_settings(args, transport)
    opts = WorkerOptions(
        role=args.role,
        model=args.model,
        family=args.family,
        port=args.port,
        http_port=args.http_port,
        host=args.host,
        next_addrs=[a for a in args.next.split(",") if a],
        pipeline=args.pipeline,
        device=args.device,
        dtype=args.dtype,
        queue_capacity=args.queue_capacity,
        overlap=not args.no_overlap,
        handoff_delay=handoff_delay(args),
        threads=args.threads,
        drain_timeout_s=args.drain_timeout,
        transport=transport,
        transport_options=transport_options,
        max_batch=args.max_batch,
        batch_wait_s=args.batch_wait_ms / 1e3,
        queue_order=args.queue_order,
        slowdown=args.slowdown,
        max_images=args.max_images,
        tls=tls,
    )
    if opts.role in ("encoder", "denoiser") and not opts.next_addrs:
        raise SystemExit(f"error: --next is required for the {opts.role} stage")
    return asyncio.run(run_worker(opts))
