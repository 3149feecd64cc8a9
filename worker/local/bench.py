"""`disagfusion bench`: throughput and latency of async, sync and monolithic serving.

Each mode runs the same request stream against a fresh local server:
- async: disaggregated stages with overlap on (receive / compute / send concurrently),
- sync: disaggregated stages with overlap off (one request at a time per worker),
- monolithic: the same number of processes, each running the whole pipeline.
`--handoff-delay-ms` emulates network time per hand-off between stages;
`auto` sets it to half the denoiser's measured compute time per request.
`--max-batch 1,4` runs async once per batch setting, each on a fresh server,
reported as `async@batch1`, `async@batch4`. sync never batches (a worker with
overlap off computes one request at a time) and neither does monolithic (one
plain pipeline per process: what a user would run instead).
`--ratio planner` splits `--processes` worker processes over the stages as
`disagfusion plan` splits a GPU budget (most pipeline throughput), from each
stage's service time measured by a short calibration run first.
`--json` prints one object: {"params": the run's settings, "modes": run -> result}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from disagfusion.cli.common import int_at_least, non_negative_float
from disagfusion.scheduling.queue_order import QUEUE_ORDERS
from disagfusion.scheduling.stages import STAGES
from disagfusion.scheduling.stats import percentile
from disagfusion.worker.gateway.client import post_json
from disagfusion.worker.local.bench_stages import (
    activity,
    mean_service_s,
    planned_counts,
    scrape_all,
)
from disagfusion.worker.local.launcher import LocalCluster, LocalOptions, free_port

MODES = ("async", "sync", "monolithic")
BATCHED_MODES = ("async",)  # sync workers compute one at a time; monolithic never batches
RATIOS = ("flags", "planner")
CALIBRATION_REQUESTS = 4  # one at a time: each stage's uncontended service time


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
    # Per role, over the measured requests: the share of wall_s its instances spent
    # computing (mean over instances), and requests per pipeline call.
    stage_busy: dict[str, float] = field(default_factory=dict)
    batch_mean: dict[str, float] = field(default_factory=dict)


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
    # The stage workers' batching and queue order; None: the workers' own defaults.
    max_batch: list[int] | None = None
    batch_wait_ms: float = 0.0
    queue_order: str | None = None
    # How encoders/denoisers/decoders were chosen: "flags" or "planner" (from the
    # calibration's service times, recorded in stage_service_ms).
    ratio: str = "flags"
    stage_service_ms: dict[str, float] | None = None  # per stage, from the calibration run


@dataclass(frozen=True)
class Run:
    """One server started and driven: `label` is its key in the report."""

    label: str
    mode: str
    max_batch: int | None  # None: the workers' default (no --max-batch passed)


def plan_runs(modes: list[str], max_batch: list[int] | None) -> list[Run]:
    """Modes in order; with a batch list, async once per batch setting."""
    runs = []
    for mode in modes:
        if max_batch and mode in BATCHED_MODES:
            runs += [Run(f"{mode}@batch{b}", mode, b) for b in max_batch]
        else:
            runs.append(Run(mode, mode, None))
    return runs


def batch_list(text: str) -> list[int]:
    """`--max-batch`: a comma list of distinct integers >= 1, e.g. `1,4`."""
    sizes: list[int] = []
    for part in text.split(","):
        try:
            size = int(part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers >= 1, got {part.strip()!r} in {text!r}"
            ) from None
        if size < 1:
            raise argparse.ArgumentTypeError(f"a batch size must be >= 1, got {size} in {text!r}")
        if size in sizes:
            raise argparse.ArgumentTypeError(f"batch size {size} given twice in {text!r}")
        sizes.append(size)
    return sizes


def bench_params(
    args: argparse.Namespace, delay_ms: float, service_s: Mapping[str, float] | None = None
) -> BenchParams:
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
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        queue_order=args.queue_order,
        ratio=args.ratio,
        stage_service_ms=None
        if service_s is None
        else {s: round(service_s[s] * 1e3, 2) for s in STAGES if s in service_s},
    )


def report(params: BenchParams, results: dict[str, ModeResult]) -> dict[str, Any]:
    """The --json output: the settings once, then one result per run (in run order)."""
    return {"params": asdict(params), "modes": {label: asdict(r) for label, r in results.items()}}


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


def run_mode(
    run: Run, args: argparse.Namespace, delay_ms: float, log_dir: Path
) -> tuple[ModeResult, dict[str, float]]:
    """Serve, warm up, drive; returns the result and each role's mean compute time
    per request (the mean over its instances)."""
    mode = run.mode
    staged = mode != "monolithic"
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
        max_batch=run.max_batch,
        batch_wait_ms=args.batch_wait_ms if staged else 0.0,
        queue_order=args.queue_order if staged else None,
        max_waiting=max(32, args.concurrency * 2),
        log_dir=log_dir / run.label,
    )
    body = {"prompt": args.prompt, "size": args.size, "num_inference_steps": args.steps, "seed": 1}
    with LocalCluster(opts) as cluster:
        drive(cluster.url, body, args.warmup, 1)
        before = scrape_all(cluster)
        latencies, failed, wall = drive(cluster.url, body, args.requests, args.concurrency)
        after = scrape_all(cluster)
    busy, batch = activity(before, after, wall)
    service_s = {role: mean_service_s(sums) for role, sums in after.items()}
    result = ModeResult(
        throughput_rps=len(latencies) / wall if wall else 0.0,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        completed=len(latencies),
        failed=failed,
        processes=stages,
        handoff_delay_ms=opts.handoff_delay_ms,
        wall_s=wall,
        stage_busy=busy,
        batch_mean=batch,
    )
    return result, service_s


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
        "--requests",
        type=int_at_least(1),
        default=96,
        help="measured requests per mode (fewer make batched runs mostly ramp-up and tail)",
    )
    p.add_argument(
        "--concurrency", type=int_at_least(1), default=4, help="requests in flight at once"
    )
    p.add_argument(
        "--warmup", type=int_at_least(0), default=2, help="unmeasured requests first, one at a time"
    )
    p.add_argument(
        "--size",
        default=None,
        help="image size WIDTHxHEIGHT of every request (default: the model's default size)",
    )
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
        "--ratio",
        choices=RATIOS,
        default="flags",
        help="flags: --encoders/--denoisers/--decoders as given; planner: split --processes"
        " over the stages as `disagfusion plan` would, from service times a calibration"
        " run measures first (one request at a time, 1:1:1, no batching)",
    )
    p.add_argument(
        "--processes",
        type=int_at_least(len(STAGES)),
        default=None,
        help="with --ratio planner: worker processes to split (monolithic runs as many);"
        " unset: encoders + denoisers + decoders",
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
        "--max-batch",
        type=batch_list,
        default=None,
        metavar="B[,B...]",
        help="run async once per batch setting, reported as async@batchB (sync and"
        " monolithic never batch); unset: one async run with the workers' default",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=_milliseconds,
        default=0.0,
        help="how long a stage worker waits to fill a batch (async)",
    )
    p.add_argument(
        "--queue-order",
        choices=QUEUE_ORDERS,
        default=None,
        help="the stage workers' queue order (async, sync; see `disagfusion worker --help`);"
        " unset: the workers' default",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="directory for the processes' logs (unset: a new temporary directory)",
    )


def describe_activity(result: ModeResult) -> str:
    """`busy encoder 5% denoiser 97% ... batch denoiser 3.6`: where the time went."""
    busy = " ".join(f"{role} {share:.0%}" for role, share in result.stage_busy.items())
    batched = " ".join(f"{role} {b:g}" for role, b in result.batch_mean.items() if b > 1)
    return f"busy {busy}" + (f", mean batch {batched}" if batched else "")


def comparisons(results: dict[str, ModeResult]) -> list[str]:
    """Throughput ratios worth a line: async over sync at the same batch setting,
    each batch setting over the first one, every async run over monolithic."""
    rps = {label: r.throughput_rps for label, r in results.items()}
    lines = []
    for label in rps:
        mode, _, batch = label.partition("@")
        suffix = f"@{batch}" if batch else ""
        if mode == "async" and rps.get("sync" + suffix):
            lines.append(f"{label} / sync{suffix}: {rps[label] / rps['sync' + suffix]:.2f}x")
        first = next((other for other in rps if other.startswith(mode + "@")), None)
        if batch and first and first != label and rps[first]:
            lines.append(f"{label} / {first}: {rps[label] / rps[first]:.2f}x")
        if mode == "async" and rps.get("monolithic"):
            lines.append(f"{label} / monolithic: {rps[label] / rps['monolithic']:.2f}x")
    return [f"throughput {line}" for line in lines]


STAGE_FLAGS = {"encoders": "encoder", "denoisers": "denoiser", "decoders": "decoder"}


def with_counts(
    args: argparse.Namespace, counts: Mapping[str, int], **more: Any
) -> argparse.Namespace:
    """`args` with `counts` processes per stage (and `more` flags) in place of the flags'."""
    per_flag = {flag: counts[stage] for flag, stage in STAGE_FLAGS.items()}
    return argparse.Namespace(**{**vars(args), **per_flag, **more})


def calibrate(
    args: argparse.Namespace, log_dir: Path, counts: Mapping[str, int]
) -> dict[str, float]:
    """Each stage's compute time per request with no emulated delay: a few requests,
    one at a time, on a fresh async server with `counts` processes per stage."""
    calib = with_counts(args, counts, requests=CALIBRATION_REQUESTS, concurrency=1)
    _, service_s = run_mode(Run("calibration", "async", None), calib, 0.0, log_dir)
    shown = ", ".join(f"{s} {service_s[s] * 1e3:.1f} ms" for s in STAGES)
    print(f"calibration: compute per request {shown}", file=sys.stderr)
    return service_s


def _default_size(model: str) -> str:
    from disagfusion.worker.models import describe_model

    width, height = describe_model(model).sizes.default_size
    return f"{width}x{height}"


def run_bench_command(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        print(f"error: unknown mode(s) {unknown}; choose from {list(MODES)}", file=sys.stderr)
        return 2
    if args.processes is not None and args.ratio != "planner":
        print("error: --processes needs --ratio planner", file=sys.stderr)
        return 2
    if args.size is None:
        args = argparse.Namespace(**{**vars(args), "size": _default_size(args.model)})
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="disagfusion-bench-"))
    counts = {stage: getattr(args, flag) for flag, stage in STAGE_FLAGS.items()}
    service_s = None
    if args.ratio == "planner" or args.handoff_delay_ms == "auto":
        service_s = calibrate(
            args, log_dir, dict.fromkeys(STAGES, 1) if args.ratio == "planner" else counts
        )
    if args.ratio == "planner":
        assert service_s is not None
        budget = args.processes or sum(counts.values())
        try:
            counts = planned_counts(service_s, budget)
        except ValueError as err:
            print(f"error: --ratio planner: {err}", file=sys.stderr)
            return 2
        shown = ":".join(str(counts[s]) for s in STAGES)
        print(
            f"planner ratio for {budget} processes: {shown} (encoder:denoiser:decoder)",
            file=sys.stderr,
        )
        args = with_counts(args, counts)
    if args.handoff_delay_ms == "auto":
        assert service_s is not None
        delay_ms = round(service_s["denoiser"] * 1e3 / 2, 1)
        print(f"handoff delay {delay_ms} ms (half the denoiser's compute)", file=sys.stderr)
    else:
        delay_ms = float(args.handoff_delay_ms)
    results: dict[str, ModeResult] = {}
    for run in plan_runs(modes, args.max_batch):
        result, _ = run_mode(run, args, delay_ms, log_dir)
        results[run.label] = result
        print(
            f"{run.label:>16}: {result.throughput_rps:6.2f} req/s  p50 {result.latency_p50_s:6.3f}s"
            f"  p95 {result.latency_p95_s:6.3f}s  ({result.completed} ok, {result.failed} "
            f"failed, {result.processes} processes, delay {result.handoff_delay_ms} ms)"
            f"  {describe_activity(result)}",
            file=sys.stderr,
        )
    for line in comparisons(results):
        print(line, file=sys.stderr)
    if args.json:
        print(json.dumps(report(bench_params(args, delay_ms, service_s), results), indent=2))
    return 0 if all(r.failed == 0 for r in results.values()) else 1
