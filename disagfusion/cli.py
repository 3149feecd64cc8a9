"""The `disagfusion` console script: worker, gateway, serve, generate, bench, operator,
plan, profile, simulate."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from disagfusion.cli_common import (
    HelpFormatter,
    non_negative_float,
    one_line_errors,
    port,
    positive_float,
    positive_int,
)
from disagfusion.worker.params import ROLES, STAGES

if TYPE_CHECKING:
    from disagfusion.worker.elastic import Autoscaler
    from disagfusion.worker.launcher import LocalCluster
    from disagfusion.worker.sender import HandoffDelay

DEFAULT_MODEL = "builtin:tiny-unet"


HELP = HelpFormatter  # every flag shows its default


def _add_handoff_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--handoff-delay-ms",
        type=non_negative_float,
        default=0.0,
        help="emulated network time added to every hand-off (benchmarks)",
    )
    p.add_argument(
        "--handoff-jitter-ms",
        type=non_negative_float,
        default=0.0,
        help="uniform jitter around --handoff-delay-ms",
    )


def _handoff_delay(args: argparse.Namespace) -> HandoffDelay:
    from disagfusion.worker.sender import HandoffDelay

    return HandoffDelay(args.handoff_delay_ms / 1e3, args.handoff_jitter_ms / 1e3)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="builtin:NAME, a local diffusers directory, or a hub id in the local HF cache",
    )


def _add_served_name(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--served-model-name",
        default=None,
        help="public model id in /v1/models and requests (default: the model's display name;"
        " the --model string is always accepted too)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disagfusion", description=__doc__, formatter_class=HELP)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("DISAGFUSION_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"],
        help="log level ($DISAGFUSION_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser(
        "worker", help="run one stage worker (what a pod runs)", formatter_class=HELP
    )
    w.add_argument(
        "--stage", "--role", dest="role", choices=ROLES, required=True, help="the stage to run"
    )
    _add_model_args(w)
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
    _add_handoff_args(w)

    g = sub.add_parser("gateway", help="run the HTTP/gRPC gateway alone", formatter_class=HELP)
    _add_model_args(g)
    _add_served_name(g)
    g.add_argument("--port", type=port, default=8000, help="HTTP port (OpenAI API)")
    g.add_argument(
        "--grpc-port", type=port, required=True, help="gRPC port (results, Gateway.Generate)"
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
    g.add_argument("--max-images", type=positive_int, default=4, help="largest n in one request")
    g.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=60.0,
        help="on SIGTERM: seconds to finish accepted requests before answering them 503",
    )
    _add_handoff_args(g)

    s = sub.add_parser("serve", help="serve a pipeline as local processes", formatter_class=HELP)
    s.add_argument(
        "--local",
        action="store_true",
        required=True,
        help="run the gateway and stage workers as local processes",
    )
    _add_model_args(s)
    _add_served_name(s)
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
    _add_handoff_args(s)

    gen = sub.add_parser(
        "generate", help="generate images through a server, or in-process", formatter_class=HELP
    )
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("out.png"),
        help="PNG to write (with -n > 1: NAME-0.png, NAME-1.png, ...)",
    )
    gen.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="the gateway (a trailing /v1, as OpenAI clients use, is fine)",
    )
    gen.add_argument(
        "--api-key",
        default=None,
        help="bearer key (default: $DISAGFUSION_API_KEY, then $OPENAI_API_KEY)",
    )
    gen.add_argument("--seed", type=int, default=None, help="seed (default: random)")
    gen.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the model's)"
    )
    gen.add_argument("--size", default=None, help="WIDTHxHEIGHT (default: the model's)")
    gen.add_argument(
        "--guidance", type=float, default=None, help="guidance scale (default: the model's)"
    )
    gen.add_argument("--negative-prompt", default=None, help="what not to draw")
    gen.add_argument("-n", type=int, default=1, help="images to generate")
    gen.add_argument(
        "--in-process",
        action="store_true",
        help="run the whole diffusers pipeline in this process (the baseline)",
    )
    gen.add_argument(
        "--model",
        default=None,
        help="model id to ask the server for; with --in-process the model to load"
        f" (default {DEFAULT_MODEL})",
    )

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

    b = sub.add_parser(
        "bench", help="throughput/latency: async vs sync vs monolithic", formatter_class=HELP
    )
    from disagfusion.worker.bench import add_bench_args

    add_bench_args(b)

    # Scheduling tools: each module adds its subcommands and sets `func`.
    from disagfusion import cli_plan, cli_simulate

    cli_plan.register(sub)
    cli_simulate.register(sub)
    for each in (parser, *sub.choices.values()):
        one_line_errors(each)
    return parser


def _cmd_worker(args: argparse.Namespace) -> int:
    from disagfusion.worker.serve import WorkerOptions, run_worker

    opts = WorkerOptions(
        role=args.role,
        model=args.model,
        port=args.port,
        http_port=args.http_port,
        host=args.host,
        next_addrs=[a for a in args.next.split(",") if a],
        pipeline=args.pipeline,
        device=args.device,
        dtype=args.dtype,
        queue_capacity=args.queue_capacity,
        overlap=not args.no_overlap,
        handoff_delay=_handoff_delay(args),
        threads=args.threads,
        drain_timeout_s=args.drain_timeout,
    )
    if opts.role in ("encoder", "denoiser") and not opts.next_addrs:
        raise SystemExit(f"error: --next is required for the {opts.role} stage")
    return asyncio.run(run_worker(opts))


def _cmd_gateway(args: argparse.Namespace) -> int:
    from disagfusion.worker.serve import GatewayOptions, run_gateway

    try:
        topology = parse_topology(args.topology)
    except ValueError as err:
        print(f"error: --topology: {err}", file=sys.stderr)
        return 2
    return asyncio.run(
        run_gateway(
            GatewayOptions(
                model=args.model,
                port=args.port,
                grpc_port=args.grpc_port,
                stage_addrs=topology,
                host=args.host,
                advertise_host=args.advertise_host,
                pipeline=args.pipeline,
                max_waiting=args.max_queue,
                max_pending=args.max_pending,
                request_timeout_s=args.request_timeout,
                max_images=args.max_images,
                api_key=os.environ.get("DISAGFUSION_API_KEY") or None,
                handoff_delay=_handoff_delay(args),
                served_model_name=args.served_model_name,
                drain_timeout_s=args.drain_timeout,
            )
        )
    )


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


def _cmd_serve(args: argparse.Namespace) -> int:
    from disagfusion.worker.launcher import (
        LocalCluster,
        LocalOptions,
        StageLost,
        example_commands,
        port_is_free,
    )
    from disagfusion.worker.models import describe_model

    problem = _autoscale_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not port_is_free(args.port):
        print(f"error: port {args.port} is in use; pick another with --port", file=sys.stderr)
        return 2
    info = describe_model(args.model)
    cluster = LocalCluster(
        LocalOptions(
            model=args.model,
            port=args.port,
            encoders=args.encoders,
            denoisers=args.denoisers,
            decoders=args.decoders,
            overlap=not args.no_overlap,
            handoff_delay_ms=args.handoff_delay_ms,
            handoff_jitter_ms=args.handoff_jitter_ms,
            threads=args.threads,
            max_waiting=args.max_queue,
            log_dir=args.log_dir,
            max_workers=args.max_workers if args.autoscale else 0,
            shutdown_drain_s=args.drain_timeout,
            served_model_name=args.served_model_name,
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
        print("try:\n  " + "\n  ".join(example_commands(cluster.url, size)), flush=True)
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
    from disagfusion.operator.hybrid import HybridPolicy
    from disagfusion.worker.elastic import Autoscaler, local_knobs, local_profile

    if args.profile:
        from disagfusion.cli_plan import load_profile

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


def _cmd_generate(args: argparse.Namespace) -> int:
    from disagfusion.worker.client import generate_in_process, generate_remote

    body: dict[str, object] = {"prompt": args.prompt, "n": args.n}
    for key, value in (
        ("seed", args.seed),
        ("num_inference_steps", args.steps),
        ("size", args.size),
        ("guidance_scale", args.guidance),
        ("negative_prompt", args.negative_prompt),
    ):
        if value is not None:
            body[key] = value
    problem = _unwritable(args.output)
    if problem:  # say so before spending minutes on the images
        print(f"error: -o {args.output}: {problem}", file=sys.stderr)
        return 2
    if args.in_process:
        pngs = generate_in_process(args.model or DEFAULT_MODEL, body)
    else:
        if args.model:
            body["model"] = args.model
        api_key = (
            args.api_key
            or os.environ.get("DISAGFUSION_API_KEY")
            or os.environ.get("OPENAI_API_KEY")
            or None
        )
        pngs = generate_remote(args.url, body, api_key=api_key)
    for path in _output_paths(args.output, len(pngs)):
        path.write_bytes(pngs.pop(0))
        print(path)
    return 0


def _unwritable(output: Path) -> str:
    """Why `output` cannot be written, or ""."""
    folder = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        return "is a directory; name a file, e.g. out.png"
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"the folder {folder} is not writable"
    return ""


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import about optional vision backends we never use.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {args.command}[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    from disagfusion.worker.client import ClientError
    from disagfusion.worker.models import ModelSourceError

    handlers = {
        "worker": _cmd_worker,
        "gateway": _cmd_gateway,
        "serve": _cmd_serve,
        "generate": _cmd_generate,
        "bench": _bench,
        "operator": _cmd_operator,
    }
    try:
        func = getattr(args, "func", None)
        if func is not None:
            return int(func(args))
        return handlers[args.command](args)
    except (ClientError, ModelSourceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _cmd_operator(args: argparse.Namespace) -> int:
    from disagfusion.operator.run import NoClusterConfig, run_operator

    namespaces = args.namespace or ([] if args.all_namespaces else ["default"])
    try:
        return run_operator(
            namespaces,
            args.all_namespaces,
            args.metrics_port,
            liveness_port=args.liveness_port,
            prometheus_url=args.prometheus_url,
        )
    except NoClusterConfig as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    from disagfusion.worker.bench import run_bench_command

    return run_bench_command(args)
