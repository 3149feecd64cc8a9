"""`disagfusion simulate`: replay a request trace through a simulated cluster under
each scaling policy and compare latency, SLO attainment and GPU-hours.

    disagfusion simulate --trace builtin:diurnal --profile builtin:qwen-image-h100 \\
        --policy static-disagg,hybrid,oracle --json --plot out.png
    disagfusion simulate --list --json
    disagfusion simulate --dump-trace builtin:burst --profile builtin:qwen-image-h100 -o t.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

BUILTIN = "builtin:"


class UsageError(ValueError):
    """Printed as `error: ...`, exit status 2."""


def register(sub: Any) -> None:
    """Add this module's subcommands to the `disagfusion` parser."""
    p = sub.add_parser(
        "simulate",
        help="replay a trace through a simulated cluster under scaling policies",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--trace", help="a JSONL trace file or builtin:NAME (see --list)")
    p.add_argument("--profile", help="a profile file or builtin:NAME (see --list)")
    p.add_argument("--gpus", type=int, default=None, help="GPU budget (default: the profile's)")
    p.add_argument("--slo", default=None, help="'30s' or '2x' (default: the profile's)")
    p.add_argument(
        "--policy",
        default=None,
        help="comma-separated policies (default: all): static-monolithic, static-disagg,"
        " threshold, hpa, hybrid, oracle",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG: replicas and latency")
    p.add_argument("--seed", type=int, default=0, help="seeds the service-time noise and traces")
    p.add_argument("--noise", type=float, default=0.1, help="sigma of the lognormal noise")
    p.add_argument(
        "--max-queue", type=int, default=None, help="gateway queue limit (default 10 x GPUs)"
    )
    p.add_argument(
        "--requests", type=int, default=None, help="rescale a builtin trace to about N requests"
    )
    p.add_argument("--timing", action="store_true", help="print wall seconds per policy")
    p.add_argument("--list", action="store_true", help="list builtin traces, profiles, policies")
    p.add_argument("--dump-trace", metavar="TRACE", help="write a builtin trace as JSONL")
    p.add_argument("-o", "--output", type=Path, default=None, help="with --dump-trace")
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
    from disagfusion.operator.baselines import POLICY_NAMES
    from disagfusion.operator.builtin_profiles import BUILTIN_PROFILES
    from disagfusion.operator.traces import BUILTIN_TRACES

    out: dict[str, list[Any]] = {
        "traces": [
            {"name": BUILTIN + n, "description": d + " (relative to the profile and budget)"}
            for n, d in BUILTIN_TRACES.items()
        ],
        "profiles": [
            {
                "name": BUILTIN + n,
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


def _profile(args: argparse.Namespace) -> Any:
    from disagfusion.cli_plan import load_profile
    from disagfusion.operator.profile import ProfileError

    if not args.profile:
        raise UsageError("--profile is required (a file or builtin:NAME; see --list)")
    try:
        return load_profile(args.profile)
    except ProfileError as err:
        raise UsageError(f"profile {args.profile}: {err}") from None


def _budget(args: argparse.Namespace, profile: Any) -> int:
    gpus = args.gpus or profile.default_gpus
    if gpus is None:
        raise UsageError(f"profile {profile.name} has no default GPU budget: give --gpus")
    if gpus < 1:
        raise UsageError(f"--gpus must be >= 1, got {gpus}")
    return int(gpus)


def _trace(spec: str | None, args: argparse.Namespace, profile: Any, gpus: int) -> list[Any]:
    from disagfusion.operator.traces import TraceError, builtin_trace, parse_trace_lines

    if not spec:
        raise UsageError("--trace is required (a JSONL file or builtin:NAME; see --list)")
    if args.requests is not None and args.requests < 1:
        raise UsageError(f"--requests must be >= 1, got {args.requests}")
    if spec.startswith(BUILTIN):
        try:
            return builtin_trace(
                spec.removeprefix(BUILTIN), profile, gpus, args.seed, args.requests
            )
        except KeyError as err:
            raise UsageError(str(err.args[0])) from None
        except ValueError as err:
            raise UsageError(f"trace {spec}: {err}") from None
    if args.requests is not None:
        raise UsageError("--requests rescales builtin traces only")
    try:
        with open(spec) as f:
            return parse_trace_lines(f, profile.default_request)
    except OSError as err:
        raise UsageError(f"cannot read {spec}: {err.strerror or err}") from None
    except (TraceError, UnicodeDecodeError) as err:
        raise UsageError(f"trace {spec}: {err}") from None


def _dump(args: argparse.Namespace) -> int:
    from disagfusion.operator.traces import trace_to_lines

    if not args.dump_trace.startswith(BUILTIN):
        raise UsageError("--dump-trace takes builtin:NAME (see --list)")
    profile = _profile(args)
    requests = _trace(args.dump_trace, args, profile, _budget(args, profile))
    lines = "".join(line + "\n" for line in trace_to_lines(requests))
    if args.output is None:
        sys.stdout.write(lines)
        return 0
    try:
        args.output.write_text(lines)
    except OSError as err:
        raise UsageError(f"cannot write {args.output}: {err.strerror or err}") from None
    print(f"{args.output}: {len(requests)} requests", file=sys.stderr)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from disagfusion.operator.baselines import POLICY_NAMES, make_policy
    from disagfusion.operator.profile import parse_slo
    from disagfusion.operator.simulate import SimConfig, SimulationError, simulate

    profile = _profile(args)
    gpus = _budget(args, profile)
    slo = args.slo or profile.default_slo or "2x"
    try:
        parse_slo(slo)
    except ValueError as err:
        raise UsageError(str(err)) from None
    names = [n.strip() for n in (args.policy or ",".join(POLICY_NAMES)).split(",") if n.strip()]
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
    cfg = SimConfig(
        gpus=gpus,
        slo=slo,
        max_queue=args.max_queue or 10 * gpus,
        seed=args.seed,
        noise_sigma=args.noise,
        record=args.plot is not None,
    )
    results = []
    for name in names:
        start = time.perf_counter()
        try:
            policy = make_policy(name, profile, requests, gpus, slo)
            results.append(simulate(profile, requests, policy, cfg))
        except (SimulationError, ValueError) as err:
            raise UsageError(f"policy {name}: {err}") from None
        if args.timing:
            wall = time.perf_counter() - start
            print(f"{name}: {wall:.2f} s wall for {len(requests)} requests", file=sys.stderr)
    out = {
        "trace": args.trace,
        "profile": profile.name,
        "gpus": gpus,
        "slo": slo,
        "requests": len(requests),
        "duration_s": round(requests[-1].t, 3) if requests else 0.0,
        "policies": {r.policy: r.summary() for r in results},
    }
    if args.plot is not None:
        _plot(results, args.plot, f"{args.trace} on {profile.name}, {gpus} GPUs, SLO {slo}")
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print_table(out)
    return 0


def _plot(results: list[Any], path: Path, title: str) -> None:
    try:
        from disagfusion.operator.plot import plot_results
    except ImportError as err:
        raise UsageError(f"--plot needs matplotlib ({err})") from None
    try:
        plot_results(results, path, title)
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
