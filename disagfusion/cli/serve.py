"""`disagfusion serve --local`: the gateway and stage workers as local processes."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from disagfusion.worker.local.elastic import Autoscaler
    from disagfusion.worker.local.launcher import LocalCluster

from disagfusion.cli.common import (
    HELP,
    add_batching_args,
    add_handoff_args,
    add_job_store_args,
    add_model_args,
    add_served_name,
    add_transport_args,
    non_negative_float,
    port,
    positive_float,
    positive_int,
    require_extra,
    transport_settings,
)


def register(sub: Any) -> None:
    """Add `serve` to the `disagfusion` parser."""
    s = sub.add_parser("serve", help="serve a pipeline as local processes", formatter_class=HELP)
    s.add_argument(
        "--local",
        action="store_true",
        required=True,
        help="run the gateway and stage workers as local processes",
    )
    add_model_args(s)
    add_served_name(s)
    add_job_store_args(s)
    s.add_argument("--port", type=port, default=8000, help="the gateway's HTTP port")
    s.add_argument("--encoders", type=positive_int, default=1, help="encoder processes")
    s.add_argument("--denoisers", type=positive_int, default=1, help="denoiser processes")
    s.add_argument("--decoders", type=positive_int, default=1, help="decoder processes")
    s.add_argument(
        "--no-overlap",
        action="store_true",
        help="synchronous workers: receive, compute, send one request at a time",
    )
    s.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads per worker (default: the cores split between workers)",
    )
    s.add_argument(
        "--max-queue",
        type=positive_int,
        default=32,
        help="accepted requests waiting for the first stage before 429",
    )
    s.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="write each process's output to DIR/NAME.log (default: this terminal)",
    )
    s.add_argument(
        "--startup-timeout",
        type=positive_float,
        default=600.0,
        help="seconds to wait for every process to be ready",
    )
    s.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=60.0,
        help="on Ctrl-C/SIGTERM: seconds to finish accepted requests before answering them 503",
    )
    s.add_argument(
        "--autoscale",
        action="store_true",
        help="add and remove stage workers with the hybrid policy (prints each action)",
    )
    s.add_argument(
        "--max-workers",
        type=int,
        default=6,
        help="with --autoscale: stage workers running at once, at most (>= 3)",
    )
    s.add_argument(
        "--autoscale-interval",
        type=float,
        default=5.0,
        help="with --autoscale: seconds between metric scrapes and decisions",
    )
    s.add_argument(
        "--profile",
        default=None,
        help="with --autoscale: performance profile, a file or builtin:NAME"
        " (default: rough CPU costs of builtin:tiny-unet, corrected by feedback)",
    )
    add_batching_args(s)
    s.add_argument(
        "--slowdown",
        action="append",
        default=[],
        type=_slowdown,
        metavar="STAGE:INDEX=FACTOR",
        help="emulate a slower accelerator for one instance, e.g. denoiser:1=2.7 (repeatable):"
        " its calls take FACTOR times their compute time",
    )
    s.add_argument(
        "--slo",
        default=None,
        help="the gateway stamps each request with the deadline of this SLO ('30s', or '3x'"
        " its predicted unloaded time), which --queue-order edf serves by",
    )
    add_handoff_args(s)
    add_transport_args(s)
    s.add_argument(
        "--tls",
        action="store_true",
        help="mTLS between every process: a throwaway CA and one certificate per process in a"
        " private temporary directory (needs the cryptography package); the HTTP port stays"
        " plaintext",
    )
    s.add_argument(
        "--tls-allow-plaintext-data",
        action="store_true",
        help="with --tls, still allow --transport torch or nixl, whose tensor bytes bypass gRPC"
        " and are not encrypted",
    )
    s.set_defaults(func=_cmd_serve)


def _slowdown(text: str) -> tuple[tuple[str, int], float]:
    """'denoiser:1=2.7' -> (("denoiser", 1), 2.7)."""
    from disagfusion.worker.params import STAGES

    where, sep, factor = text.partition("=")
    stage, colon, index = where.partition(":")
    try:
        value, number = float(factor), int(index)
    except ValueError:
        value, number = float("nan"), -1
    if not sep or not colon or stage not in STAGES or number < 0:
        raise argparse.ArgumentTypeError(
            f"expected STAGE:INDEX=FACTOR with STAGE one of {', '.join(STAGES)}, got {text!r}"
        )
    if not 1 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"the factor must be a number >= 1, got {factor!r}")
    return (stage, number), value


def _slowdown_problem(args: argparse.Namespace) -> str | None:
    counts = {"encoder": args.encoders, "denoiser": args.denoisers, "decoder": args.decoders}
    for (stage, index), _ in args.slowdown:
        if index >= counts[stage]:
            return f"--slowdown {stage}:{index}: there are {counts[stage]} {stage}(s), from 0"
    return None


def _slo_problem(slo: str | None) -> str | None:
    from disagfusion.scheduling.profile import parse_slo

    try:
        if slo is not None:
            parse_slo(slo)
    except ValueError as err:
        return f"--slo: {err}"
    return None


def _tls_problem(args: argparse.Namespace, transport: str) -> str | None:
    """What is wrong with --tls and --tls-allow-plaintext-data, or None."""
    if not args.tls:
        if args.tls_allow_plaintext_data:
            return "--tls-allow-plaintext-data only makes sense with --tls"
        return None
    import importlib.util

    from disagfusion.worker.security.tls import TlsConfig, data_plane_problem

    problem = data_plane_problem(transport, TlsConfig(b"", b"", b"", args.tls_allow_plaintext_data))
    if problem:
        return problem.replace("--tls-allow-plaintext-data", "--tls --tls-allow-plaintext-data")
    if importlib.util.find_spec("cryptography") is None:
        return "--tls makes certificates with the cryptography package: pip install cryptography"
    return None


def _job_store_args(args: argparse.Namespace) -> list[str]:
    out = ["--video-retention", str(args.video_retention)]
    if args.data_dir:
        out += ["--data-dir", str(Path(args.data_dir).resolve())]
    if args.job_store:
        out += ["--job-store", args.job_store]
    return out


def _cmd_serve(args: argparse.Namespace) -> int:
    require_extra("worker")
    from disagfusion.worker.local.launcher import (
        LocalCluster,
        LocalOptions,
        StageLost,
        example_commands,
        port_is_free,
    )
    from disagfusion.worker.models import describe_model

    problem = _autoscale_problem(args) or _slo_problem(args.slo) or _slowdown_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not port_is_free(args.port):
        print(f"error: port {args.port} is in use; pick another with --port", file=sys.stderr)
        return 2
    transport, transport_options = transport_settings(args)
    problem = _tls_problem(args, transport)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    info = describe_model(args.model, family=args.family)
    cluster = LocalCluster(
        LocalOptions(
            model=args.model,
            family=args.family,
            port=args.port,
            encoders=args.encoders,
            denoisers=args.denoisers,
            decoders=args.decoders,
            overlap=not args.no_overlap,
            handoff_delay_ms=args.handoff_delay_ms,
            handoff_jitter_ms=args.handoff_jitter_ms,
            transport=transport,
            transport_options=transport_options,
            threads=args.threads,
            max_waiting=args.max_queue,
            log_dir=args.log_dir,
            max_workers=args.max_workers if args.autoscale else 0,
            shutdown_drain_s=args.drain_timeout,
            served_model_name=args.served_model_name,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            queue_order=args.queue_order,
            slo=args.slo,
            slowdown=dict(args.slowdown),
            gateway_args=_job_store_args(args),
            tls=args.tls,
            tls_allow_plaintext_data=args.tls_allow_plaintext_data,
        ),
        report=_log_line,
    )
    try:
        scaler = _autoscaler(args, cluster) if args.autoscale else None
    except (ValueError, KeyError, OSError) as err:  # a profile that cannot be used
        print(f"error: --profile {args.profile}: {err}", file=sys.stderr)
        return 2
    stop = {"signals": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signals"] += 1
        if stop["signals"] > 1:
            cluster.hurry()  # a second Ctrl-C: stop now, without draining

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster.start()
    try:
        give_up = time.monotonic() + args.startup_timeout
        while not stop["signals"]:
            try:
                cluster.wait_ready(timeout_s=0.5)
                break
            except TimeoutError:
                if time.monotonic() > give_up:
                    print(f"error: not ready after {args.startup_timeout:g}s", file=sys.stderr)
                    return 1
            except RuntimeError as err:  # a child exited while starting
                print(f"error: {err}", file=sys.stderr)
                return 1
        if stop["signals"]:
            return 0
        size = f"{info.default_size[0]}x{info.default_size[1]}"
        print(
            f"\ndisagfusion serving {args.served_model_name or info.name}"
            f" ({_instance_counts(cluster.workers)}) at {cluster.url}",
            flush=True,
        )
        print(
            "try:\n  " + "\n  ".join(example_commands(cluster.url, size, info.is_video)), flush=True
        )
        if scaler is not None:
            print(
                f"autoscaling up to {args.max_workers} workers every"
                f" {args.autoscale_interval:g}s with profile {scaler.profile.name}",
                flush=True,
            )
        next_step = time.monotonic() + args.autoscale_interval
        while not stop["signals"]:
            try:
                cluster.supervise()
            except StageLost as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                return 1
            if scaler is not None and time.monotonic() >= next_step:
                scaler.safe_step()
                next_step = time.monotonic() + args.autoscale_interval
            time.sleep(0.25)
        _log_line(
            f"stopping: the gateway refuses new requests and finishes accepted ones"
            f" (up to {args.drain_timeout:g}s; Ctrl-C again to stop at once)"
        )
        return 0
    finally:
        cluster.stop()


def _log_line(line: str) -> None:
    print(time.strftime("%H:%M:%S ") + line, file=sys.stderr, flush=True)


def _instance_counts(workers: Mapping[str, Sequence[object]]) -> str:
    """'1 encoder, 2 denoisers, 1 decoder'."""
    return ", ".join(f"{len(v)} {k}{'' if len(v) == 1 else 's'}" for k, v in workers.items())


def _autoscale_problem(args: argparse.Namespace) -> str:
    """What is wrong with the autoscaling flags, or ""."""
    if not args.autoscale:
        return ""
    if args.max_workers < 3:
        return f"--max-workers must be >= 3 (one worker per stage), got {args.max_workers}"
    start = args.encoders + args.denoisers + args.decoders
    if start > args.max_workers:
        return f"{start} workers to start exceed --max-workers {args.max_workers}"
    if not args.autoscale_interval > 0:
        return f"--autoscale-interval must be > 0, got {args.autoscale_interval:g}"
    return ""


def _autoscaler(args: argparse.Namespace, cluster: LocalCluster) -> Autoscaler:
    from disagfusion.scheduling.hybrid import HybridPolicy
    from disagfusion.worker.local.elastic import Autoscaler, local_knobs, local_profile

    if args.profile:
        from disagfusion.cli.plan import load_profile

        profile = load_profile(args.profile)
    else:
        profile = local_profile()
    return Autoscaler(
        cluster,
        HybridPolicy(),
        profile,
        local_knobs(args.max_workers, args.autoscale_interval),
        args.max_workers,
        report=lambda line: print(time.strftime("%H:%M:%S ") + line, flush=True),
    )
