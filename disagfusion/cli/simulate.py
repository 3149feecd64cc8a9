"""`disagfusion simulate`: replay a request trace through a simulated cluster under
each scaling policy and compare latency, SLO attainment and GPU-hours.

    disagfusion simulate --trace builtin:diurnal --profile builtin:qwen-image-h100 \\
        --policy static-disagg,hybrid,oracle --json --plot out.png
    disagfusion simulate --trace builtin:mixed-light-heavy --profile builtin:qwen-image-h100 \\
        --policy hybrid,oracle --queue-order fifo,edf --json
    disagfusion simulate --list --json

With one --queue-order the JSON is {..., "policies": {NAME: row}}; with several
it is {..., "queue_orders": {ORDER: {"policies": {NAME: row}}}}, one entry per
order in the order given.
    disagfusion simulate --dump-trace builtin:burst -o t.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disagfusion.cli.common import HelpFormatter, one_line_errors, require_extra
from disagfusion.cli.plan import MAX_GPUS
from disagfusion.scheduling.builtin_profiles import BUILTIN_PREFIX, BUILTIN_PROFILES

if TYPE_CHECKING:
    from disagfusion.cli.plot import PlotContext
    from disagfusion.scheduling.profile import Profile
    from disagfusion.scheduling.scaling import Decision, Knobs, Policy, Snapshot
    from disagfusion.scheduling.sim.simulate import Future, SimResult
    from disagfusion.scheduling.traces import TraceRequest

# Builtin traces are relative to a profile; --dump-trace uses this one unless told.
DUMP_TRACE_PROFILE = "builtin:qwen-image-h100"


class UsageError(ValueError):
    """Printed as `error: ...`, exit status 2."""


def register(sub: Any) -> None:
    """Add this module's subcommands to the `disagfusion` parser."""
    p = sub.add_parser(
        "simulate",
        help="replay a trace through a simulated cluster under scaling policies",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    one_line_errors(p)
    p.add_argument(
        "--trace",
        metavar="T",
        help="a JSONL trace file or builtin:NAME, see --list (required to simulate)",
    )
    p.add_argument(
        "--profile",
        metavar="P",
        help="a profile file or builtin:NAME, see --list (required to simulate;"
        f" default for --dump-trace: {DUMP_TRACE_PROFILE})",
    )
    p.add_argument(
        "--gpus", type=int, metavar="N", help="GPU budget (default: the profile's defaults.gpus)"
    )
    p.add_argument(
        "--slo",
        help="latency SLO, '30s' or '2x' (default: the builtin trace's own SLO if it has one,"
        " e.g. 3x for builtin:mixed-light-heavy, else the profile's defaults.slo, else 2x)",
    )
    p.add_argument(
        "--policy",
        metavar="P1,P2",
        help="comma-separated policies: static-monolithic, static-disagg, threshold, hpa,"
        " hybrid, oracle, hybrid-pools (default: all; hybrid-pools only when the profile has"
        " several accelerator types: on one it is the hybrid)",
    )
    p.add_argument(
        "--queue-order",
        metavar="O1,O2",
        default="fifo",
        help="comma-separated stage queue orders to compare: fifo, or edf (earliest SLO"
        " deadline first, aged so nothing starves) (default: fifo)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="most same-shape requests an instance serves in one call, taking the profile's"
        " batch factor; the policies plan with the same limit (default: each stage's"
        " max_batch in the profile, 1 where it has no batch term)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="write a PNG: instances, arrivals and latency per policy (default: no plot)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the service-time noise and traces")
    p.add_argument("--noise", type=float, default=0.1, help="sigma of the lognormal noise")
    p.add_argument(
        "--max-queue",
        type=int,
        metavar="N",
        help="requests queued before the gateway rejects (default: 10 x GPUs)",
    )
    p.add_argument(
        "--requests",
        type=int,
        metavar="N",
        help="rescale a builtin trace to about N requests (default: the trace's own size)",
    )
    p.add_argument(
        "--load",
        type=float,
        metavar="F",
        help="multiply a builtin trace's arrival rate by F (default 1: the rates its"
        " description gives, relative to one accelerator type per stage)",
    )
    p.add_argument("--timing", action="store_true", help="print wall seconds per policy")
    p.add_argument(
        "--list", action="store_true", help="list builtin traces, profiles and policies, and exit"
    )
    p.add_argument(
        "--dump-trace",
        metavar="builtin:NAME",
        help="write a builtin trace as JSONL, for --profile and --gpus (default profile:"
        f" {DUMP_TRACE_PROFILE}), and exit",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="FILE",
        help="with --dump-trace: the file to write (default: stdout)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        if args.list:
            return _list(args)
        if args.dump_trace:
            return _dump(args)
        return _simulate(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _list(args: argparse.Namespace) -> int:
    from disagfusion.scheduling.baselines import POLICY_NAMES
    from disagfusion.scheduling.traces import BUILTIN_TRACES

    out: dict[str, list[Any]] = {
        "traces": [
            {"name": BUILTIN_PREFIX + n, "description": d + " (relative to the profile and budget)"}
            for n, d in BUILTIN_TRACES.items()
        ],
        "profiles": [
            {
                "name": BUILTIN_PREFIX + n,
                "description": p.get("description", ""),
                "gpus": p.get("defaults", {}).get("gpus"),
                "slo": p.get("defaults", {}).get("slo"),
            }
            for n, p in BUILTIN_PROFILES.items()
        ],
        "policies": list(POLICY_NAMES),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for key in ("traces", "profiles"):
        print(f"{key}:")
        for row in out[key]:
            print(f"  {row['name']:32} {row['description']}")
    print("policies: " + ", ".join(POLICY_NAMES))
    return 0


def _profile(spec: str | None) -> Profile:
    from disagfusion.cli.plan import load_profile
    from disagfusion.scheduling.profile import ProfileError

    if not spec:
        raise UsageError("--profile is required (a file or builtin:NAME; see --list)")
    try:
        return load_profile(spec)
    except ProfileError as err:
        raise UsageError(f"profile {spec}: {err}") from None


def _budget(args: argparse.Namespace, profile: Profile) -> int:
    gpus = args.gpus if args.gpus is not None else profile.default_gpus
    if gpus is None:
        raise UsageError(f"profile {profile.name} has no default GPU budget: give --gpus")
    if not 1 <= gpus <= MAX_GPUS:
        raise UsageError(f"--gpus must be >= 1 and <= {MAX_GPUS:,}, got {gpus}")
    return int(gpus)


def _trace(
    spec: str | None, args: argparse.Namespace, profile: Profile, gpus: int
) -> list[TraceRequest]:
    from disagfusion.scheduling.traces import TraceError, builtin_trace, parse_trace_lines

    if not spec:
        raise UsageError("--trace is required (a JSONL file or builtin:NAME; see --list)")
    if args.requests is not None and args.requests < 1:
        raise UsageError(f"--requests must be >= 1, got {args.requests}")
    load = 1.0 if args.load is None else args.load
    if not (load > 0 and math.isfinite(load)):
        raise UsageError(f"--load must be a positive number, got {args.load}")
    if spec.startswith(BUILTIN_PREFIX):
        try:
            return builtin_trace(
                spec.removeprefix(BUILTIN_PREFIX), profile, gpus, args.seed, args.requests, load
            )
        except KeyError as err:
            raise UsageError(str(err.args[0])) from None
        except ValueError as err:
            raise UsageError(f"trace {spec}: {err}") from None
    if args.requests is not None or args.load is not None:
        raise UsageError("--requests and --load rescale builtin traces only")
    try:
        with open(spec) as f:
            return parse_trace_lines(f, profile.default_request)
    except OSError as err:
        raise UsageError(
            f"trace {spec}: cannot read it as a JSONL file ({err.strerror or err});"
            " builtin traces are builtin:NAME, see --list"
        ) from None
    except (TraceError, UnicodeDecodeError) as err:
        raise UsageError(f"trace {spec}: {err}") from None


def _dump(args: argparse.Namespace) -> int:
    from disagfusion.scheduling.traces import trace_to_lines

    if not args.dump_trace.startswith(BUILTIN_PREFIX):
        raise UsageError("--dump-trace takes builtin:NAME (see --list)")
    profile = _profile(args.profile or DUMP_TRACE_PROFILE)
    gpus = _budget(args, profile)
    requests = _trace(args.dump_trace, args, profile, gpus)
    lines = "".join(line + "\n" for line in trace_to_lines(requests))
    if args.output is None:
        sys.stdout.write(lines)
        return 0
    try:
        args.output.write_text(lines)
    except OSError as err:
        raise UsageError(f"cannot write {args.output}: {err.strerror or err}") from None
    print(
        f"{args.output}: {len(requests)} requests, shapes and rates for {profile.name}"
        f" on {gpus} GPUs",
        file=sys.stderr,
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from disagfusion.scheduling.baselines import POLICY_NAMES, make_policy
    from disagfusion.scheduling.profile import parse_slo, with_max_batch
    from disagfusion.scheduling.sim.simulate import SimConfig, SimulationError, simulate
    from disagfusion.scheduling.stages import STAGES

    if args.plot is not None:
        require_extra("plot")  # before a simulation that may run for minutes
    from disagfusion.scheduling.queue_order import QUEUE_ORDERS
    from disagfusion.scheduling.traces import BUILTIN_TRACE_SLOS

    orders = [o.strip() for o in args.queue_order.split(",") if o.strip()]
    bad_orders = [o for o in orders if o not in QUEUE_ORDERS]
    if bad_orders or not orders:
        raise UsageError(
            f"unknown queue order {', '.join(bad_orders) or '(none)'}"
            f" (known: {', '.join(QUEUE_ORDERS)})"
        )
    if len(set(orders)) != len(orders):
        raise UsageError(f"--queue-order names an order twice: {args.queue_order}")
    if args.max_batch is not None and args.max_batch < 1:
        raise UsageError(f"--max-batch must be >= 1, got {args.max_batch}")
    profile = _profile(args.profile)
    if args.max_batch is not None:  # the instances and the policies' model alike
        profile = with_max_batch(profile, args.max_batch)
    limits = {s: max(c.max_batch for c in profile.stages[s].values()) for s in STAGES}
    gpus = _budget(args, profile)
    trace_slo = BUILTIN_TRACE_SLOS.get((args.trace or "").removeprefix(BUILTIN_PREFIX))
    builtin = (args.trace or "").startswith(BUILTIN_PREFIX)
    slo = profile.slo_or_default(args.slo or (trace_slo if builtin else None))
    try:
        parse_slo(slo)
    except ValueError as err:
        raise UsageError(str(err)) from None
    default = [n for n in POLICY_NAMES if n != "hybrid-pools" or len(profile.accelerators) > 1]
    names = [n.strip() for n in (args.policy or ",".join(default)).split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICY_NAMES]
    if unknown or not names:
        raise UsageError(
            f"unknown policy {', '.join(unknown) or '(none)'} (known: {', '.join(POLICY_NAMES)})"
        )
    if args.max_queue is not None and args.max_queue < 1:
        raise UsageError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.noise < 0:
        raise UsageError(f"--noise must be >= 0, got {args.noise}")
    requests = _trace(args.trace, args, profile, gpus)
    by_order: dict[str, list[SimResult]] = {}
    accelerators: dict[str, dict[str, list[str]]] = {}
    for order in orders:
        cfg = SimConfig(
            gpus=gpus,
            slo=slo,
            max_queue=args.max_queue or 10 * gpus,
            seed=args.seed,
            noise_sigma=args.noise,
            record=args.plot is not None,
            queue_order=order,
            max_batch=limits,
        )
        results = by_order[order] = []
        for name in names:
            start = time.perf_counter()
            try:
                policy = AcceleratorLog(make_policy(name, profile, requests, gpus, slo))
                results.append(simulate(profile, requests, policy, cfg))
                accelerators[name] = policy.used
            except (SimulationError, ValueError) as err:
                raise UsageError(f"policy {name}: {err}") from None
            if args.timing:
                wall = time.perf_counter() - start
                label = f"{name} ({order})" if len(orders) > 1 else name
                print(f"{label}: {wall:.2f} s wall for {len(requests)} requests", file=sys.stderr)
    out: dict[str, Any] = {
        "trace": args.trace,
        "profile": profile.name,
        "gpus": gpus,
        "slo": slo,
        "requests": len(requests),
        "duration_s": round(requests[-1].t, 3) if requests else 0.0,
    }
    if max(limits.values()) > 1:  # the limit given, else the profile's per stage
        out["max_batch"] = args.max_batch or limits
    rows = {o: {"policies": {r.policy: r.summary() for r in rs}} for o, rs in by_order.items()}
    if len(orders) == 1:
        out.update(rows[orders[0]])
    else:
        out["queue_orders"] = rows
    if args.plot is not None:
        first = orders[0]  # one figure: the first order's runs
        title = f"{args.trace} on {profile.name}, {gpus} GPUs, SLO {slo}, {first} queues"
        context = plot_context(title, profile, requests, slo, accelerators)
        _plot(by_order[first], args.plot, context)
    if args.json:
        print(json.dumps(out, indent=2))
    elif len(orders) == 1:
        _print_table(out)
    else:
        for order, row in rows.items():
            print(f"queue order {order}:")
            _print_table({**out, **row})
    return 0


class AcceleratorLog:
    """A policy that notes the accelerator type it gives each pool (the simulator's
    result holds instance counts only; the plot's legend names the type)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.name = policy.name
        self.interval_s = policy.interval_s
        self.monolithic = policy.monolithic
        self.used: dict[str, list[str]] = {}  # pool -> types, in order of first use

    def prepare(self, future: Future) -> None:
        self.policy.prepare(future)

    def initial_state(self) -> Any:
        return self.policy.initial_state()

    def decide(self, snapshot: Snapshot, state: Any, profile: Profile, knobs: Knobs) -> Decision:
        decision = self.policy.decide(snapshot, state, profile, knobs)
        for pool, d in decision.stages.items():
            kinds = self.used.setdefault(pool, [])
            if d.accelerator and d.accelerator not in kinds:
                kinds.append(d.accelerator)
        return decision


def plot_context(
    title: str,
    profile: Profile,
    requests: list[TraceRequest],
    slo: str,
    accelerators: dict[str, dict[str, list[str]]],
) -> PlotContext:
    """The plot's title, arrivals, SLO line and (on a mixed pool) accelerator types."""
    from disagfusion.cli.plot import PlotContext
    from disagfusion.scheduling.profile import parse_slo
    from disagfusion.scheduling.stages import STAGES

    kind, value = parse_slo(slo)
    if kind == "seconds":
        slo_s, label = value, f"SLO {slo}"
    else:  # a slowdown: its line for the profile's default request
        accs = {s: profile.default_accelerator(s) for s in STAGES}
        slo_s = value * profile.unloaded_latency(profile.default_request, accs)
        label = f"SLO {slo} of the default request ({slo_s:.3g} s)"
    return PlotContext(
        title=title,
        arrivals=[r.t for r in requests],
        slo_s=slo_s,
        slo_label=label,
        # one type per stage says nothing; a mixed pool's legend names each stage's
        accelerators=accelerators if len(profile.accelerators) > 1 else {},
    )


def _plot(results: list[SimResult], path: Path, context: PlotContext) -> None:
    try:
        from disagfusion.cli.plot import plot_results
    except ImportError as err:
        raise UsageError(f"--plot needs matplotlib ({err})") from None
    try:
        plot_results(results, path, context)
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None


def _print_table(out: dict[str, Any]) -> None:
    print(
        f"{out['trace']} on {out['profile']}: {out['requests']} requests over"
        f" {out['duration_s'] / 3600:.2f} h, {out['gpus']} GPUs, SLO {out['slo']}"
    )
    cols = (
        "completed",
        "rejected",
        "latency_p50_s",
        "latency_p95_s",
        "slo_attainment",
        "gpu_hours",
        "scale_events",
    )
    print(f"{'policy':18}" + "".join(f"{c:>16}" for c in cols))
    for name, row in out["policies"].items():
        cells = "".join(f"{_cell(row[c]):>16}" for c in cols)
        print(f"{name:18}{cells}")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4g}"
