"""`disagfusion bench`: throughput and latency of async, sync and monolithic serving.

Each mode runs the same request stream against a fresh local server:
- async: disaggregated stages with overlap on (receive / compute / send concurrently),
- sync: disaggregated stages with overlap off (one request at a time per worker),
- monolithic: the same number of processes, each running the whole pipeline.
`--handoff-delay-ms` emulates network time per hand-off between stages;
`auto` sets it to half the denoiser's measured compute time per request.
`--json` prints one object: {"params": the run's settings, "modes": mode -> result}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from disagfusion.cli.common import int_at_least, non_negative_float
from disagfusion.scheduling.stats import percentile
from disagfusion.worker.gateway.client import post_json
from disagfusion.worker.local.launcher import LocalCluster, LocalOptions, free_port

MODES = ("async", "sync", "monolithic")


@dataclass
class ModeResult:
    throughput_rps: float
    latency_p50_s: float
    latency_p95_s: float
    completed: int
    failed: int
    processes: int
    handoff_delay_ms: float
    wall_s: float


@dataclass(frozen=True)
class BenchParams:
    """What a run measured with: the `params` of the JSON report (flag names, resolved)."""

    model: str
    size: str
    steps: int
    prompt: str
    requests: int
    concurrency: int
    warmup: int
    encoders: int
    denoisers: int
    decoders: int
    threads: int
    handoff_delay_ms: float  # applied to async and sync (monolithic has no hand-off)
    handoff_delay_auto: bool  # the delay came from --handoff-delay-ms auto
    handoff_jitter_ms: float
    transport: str = "grpc"  # how async and sync move tensors between stages


def bench_params(args: argparse.Namespace, delay_ms: float) -> BenchParams:
    return BenchParams(
        model=args.model,
        size=args.size,
        steps=args.steps,
        prompt=args.prompt,
        requests=args.requests,
        concurrency=args.concurrency,
        warmup=args.warmup,
        encoders=args.encoders,
        denoisers=args.denoisers,
        decoders=args.decoders,
        threads=args.threads,
        handoff_delay_ms=delay_ms,
        handoff_delay_auto=args.handoff_delay_ms == "auto",
        handoff_jitter_ms=args.handoff_jitter_ms,
        transport=args.transport,
    )


def report(params: BenchParams, results: dict[str, ModeResult]) -> dict[str, Any]:
    """The --json output: the settings once, then one result per mode run (in run order)."""
    return {"params": asdict(params), "modes": {mode: asdict(r) for mode, r in results.items()}}


def drive(
    url: str,
    body: dict[str, object],
    requests: int,
    concurrency: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[float], int, float]:
    """Send `requests` requests with `concurrency` in flight; (latencies, failures, wall)."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    remaining = [requests]

    def client() -> None:
        nonlocal failures
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            while True:
                t0 = clock()
                status, _ = post_json(url + "/v1/images/generations", body)
                if status == 429:  # pipeline full: back off as told, do not count
                    time.sleep(0.2)
                    continue
                with lock:
                    if status == 200:
                        latencies.append(clock() - t0)
                    else:
                        failures += 1
                break

    start = clock()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    return latencies, failures, clock() - start


def _scrape_mean(url: str, metric: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(metric + suffix + "{"):
                values[suffix] = float(line.rsplit(" ", 1)[1])
    return values["_sum"] / values["_count"] if values.get("_count") else float("nan")


def run_mode(
    mode: str, args: argparse.Namespace, delay_ms: float, log_dir: Path
) -> tuple[ModeResult, float]:
    """Serve, warm up, drive; returns the result and the denoiser's mean compute time."""
    stages = args.encoders + args.denoisers + args.decoders
    opts = LocalOptions(
        model=args.model,
        port=free_port(),
        encoders=args.encoders,
        denoisers=args.denoisers,
        decoders=args.decoders,
        monolithic=stages if mode == "monolithic" else 0,
        overlap=mode != "sync",
        handoff_delay_ms=delay_ms if mode != "monolithic" else 0.0,
        handoff_jitter_ms=args.handoff_jitter_ms if mode != "monolithic" else 0.0,
        transport=args.transport,
        transport_options=dict(args.transport_option),
        threads=args.threads,
        max_waiting=max(32, args.concurrency * 2),
        log_dir=log_dir / mode,
    )
    body = {"prompt": args.prompt, "size": args.size, "num_inference_steps": args.steps, "seed": 1}
    with LocalCluster(opts) as cluster:
        drive(cluster.url, body, args.warmup, 1)
        latencies, failed, wall = drive(cluster.url, body, args.requests, args.concurrency)
        compute_role = "monolithic" if mode == "monolithic" else "denoiser"
        denoise_s = statistics.fmean(
            _scrape_mean(c.http_url, "disagfusion_stage_service_time_seconds")
            for c in cluster.workers[compute_role]
        )
    result = ModeResult(
        throughput_rps=len(latencies) / wall if wall else 0.0,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        completed=len(latencies),
        failed=failed,
        processes=stages,
        handoff_delay_ms=opts.handoff_delay_ms,
        wall_s=wall,
    )
    return result, denoise_s


def _milliseconds(text: str) -> float:
    try:
        return non_negative_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected milliseconds >= 0, got {text!r}") from None


def _delay(text: str) -> str:
    """'auto' or milliseconds, kept as text: run_bench_command resolves 'auto'."""
    return text if text == "auto" else str(_milliseconds(text))


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json", action="store_true", help='print {"params": ..., "modes": ...} on stdout'
    )
    p.add_argument("--model", default="builtin:tiny-unet", help="model every mode serves")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help="comma-separated modes to run, in this order (monolithic runs "
        "encoders + denoisers + decoders whole-pipeline processes)",
    )
    p.add_argument(
        "--requests", type=int_at_least(1), default=24, help="measured requests per mode"
    )
    p.add_argument(
        "--concurrency", type=int_at_least(1), default=4, help="requests in flight at once"
    )
    p.add_argument(
        "--warmup", type=int_at_least(0), default=2, help="unmeasured requests first, one at a time"
    )
    p.add_argument("--size", default="128x128", help="image size WIDTHxHEIGHT of every request")
    p.add_argument("--steps", type=int_at_least(1), default=10, help="denoising steps per request")
    p.add_argument("--prompt", default="a red fox in the snow", help="prompt of every request")
    p.add_argument(
        "--encoders", type=int_at_least(1), default=1, help="encoder processes (async, sync)"
    )
    p.add_argument(
        "--denoisers", type=int_at_least(1), default=1, help="denoiser processes (async, sync)"
    )
    p.add_argument(
        "--decoders", type=int_at_least(1), default=1, help="decoder processes (async, sync)"
    )
    p.add_argument(
        "--threads", type=int_at_least(1), default=1, help="torch threads per worker process"
    )
    p.add_argument(
        "--handoff-delay-ms",
        type=_delay,
        default="0",
        help="emulated delay per hand-off between stages, or 'auto' "
        "(half the denoiser's compute time per request)",
    )
    p.add_argument(
        "--handoff-jitter-ms",
        type=_milliseconds,
        default=0.0,
        help="uniform jitter around the hand-off delay (async, sync)",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="directory for the processes' logs (unset: a new temporary directory)",
    )


def run_bench_command(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        print(f"error: unknown mode(s) {unknown}; choose from {list(MODES)}", file=sys.stderr)
        return 2
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="disagfusion-bench-"))
    results: dict[str, ModeResult] = {}
    if args.handoff_delay_ms == "auto":
        # Calibrate: the denoiser's compute time without any emulated delay.
        calib = argparse.Namespace(**{**vars(args), "requests": 4, "concurrency": 1})
        _, denoise_s = run_mode("async", calib, 0.0, log_dir / "calibration")
        delay_ms = round(denoise_s * 1e3 / 2, 1)
        print(
            f"denoiser compute {denoise_s * 1e3:.1f} ms/request -> handoff delay {delay_ms} ms",
            file=sys.stderr,
        )
    else:
        delay_ms = float(args.handoff_delay_ms)
    for mode in modes:
        result, _ = run_mode(mode, args, delay_ms, log_dir)
        results[mode] = result
        print(
            f"{mode:>10}: {result.throughput_rps:6.2f} req/s  p50 {result.latency_p50_s:6.3f}s"
            f"  p95 {result.latency_p95_s:6.3f}s  ({result.completed} ok, {result.failed} "
            f"failed, {result.processes} processes, delay {result.handoff_delay_ms} ms)",
            file=sys.stderr,
        )
    if "async" in results and "sync" in results and results["sync"].throughput_rps:
        ratio = results["async"].throughput_rps / results["sync"].throughput_rps
        print(f"async / sync throughput: {ratio:.2f}x", file=sys.stderr)
    if args.json:
        print(json.dumps(report(bench_params(args, delay_ms), results), indent=2))
    return 0 if all(r.failed == 0 for r in results.values()) else 1
