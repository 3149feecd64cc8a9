"""`disagfusion plan` (instances per stage for a budget or a rate) and `disagfusion profile`
(measure a model's stages here, or show a builtin profile)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disagfusion.cli.common import HelpFormatter, one_line_errors, require_extra
from disagfusion.scheduling.builtin_profiles import (
    BUILTIN_PREFIX,
    BUILTIN_PROFILES,
    builtin_profile,
)
from disagfusion.scheduling.profile import (
    Profile,
    ProfileError,
    RequestShape,
    parse_profile,
    profile_to_dict,
    with_max_batch,
)
from disagfusion.scheduling.stages import STAGES

if TYPE_CHECKING:
    from disagfusion.scheduling.planner import Plan

CURRENCY = "USD"  # what every profile's `cost_per_hour` is in
MAX_GPUS = 1_000_000  # the greedy planner is linear in the budget: ~2 s at this size
# JSON floats: profiles are calibrated to 3-4 digits, so 5 keep all that means anything
# and drop the noise of rounded coefficients (25.299998 -> 25.3, 0.3099988 -> 0.31).
SIGNIFICANT_DIGITS = 5
MONEY_KEYS = ("cost_per_hour",)  # rounded to cents instead


def round_floats(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """`value` with every float in it rounded to `digits` significant digits, and
    money (MONEY_KEYS) to cents."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {
            k: round(v, 2) if k in MONEY_KEYS and isinstance(v, float) else round_floats(v, digits)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [round_floats(v, digits) for v in value]
    return value


def plain_number(value: float) -> str:
    """Four significant digits without an exponent: 51.87, 3865, 25000, 0.0004000."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, 3 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}" if abs(value) < 1e4 else f"{value:.0f}"


def money(per_hour: float) -> str:
    """A cost per hour in the profiles' currency: `$1,600.00/h`."""
    return f"${per_hour:,.2f}/h"


def load_profile(spec: str) -> Profile:
    """`builtin:NAME` or a .yaml/.yml/.json file; ProfileError says what is wrong
    (callers name `spec` when they print it)."""
    if spec.startswith(BUILTIN_PREFIX):
        try:
            return builtin_profile(spec.removeprefix(BUILTIN_PREFIX))
        except KeyError as err:
            raise ProfileError([str(err.args[0])]) from None
    path = Path(spec)
    try:
        text = path.read_text()
    except OSError as err:
        raise ProfileError([f"cannot read {spec}: {err.strerror or err}"]) from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            # PyYAML's messages span lines (context, then a caret): one line here
            raise ProfileError([f"not valid YAML: {' '.join(str(err).split())}"]) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ProfileError([f"not valid JSON: {err}"]) from None
    return parse_profile(data, name=path.stem)


def load_mix(
    spec: str, profile: Profile, gpus: int | None = None
) -> tuple[tuple[RequestShape, float], ...]:
    """The shape mix of a JSONL trace file or `builtin:NAME` trace (ValueError if unusable)."""
    from disagfusion.scheduling.traces import parse_trace_lines, shape_mix

    if spec.startswith(BUILTIN_PREFIX):
        try:
            from disagfusion.scheduling.traces import builtin_trace

            requests = builtin_trace(spec.removeprefix(BUILTIN_PREFIX), profile, gpus)
        except ImportError:
            raise ValueError("builtin traces are not available in this version") from None
        except KeyError as err:
            raise ValueError(str(err.args[0]) if err.args else f"unknown trace {spec}") from None
    else:
        try:
            with open(spec) as lines:
                requests = parse_trace_lines(lines, profile.default_request)
        except OSError as err:
            raise ValueError(f"cannot read trace {spec}: {err.strerror or err}") from None
    mix = shape_mix(requests)
    if not mix:
        raise ValueError(f"trace {spec} has no requests")
    return mix


def register(sub: Any) -> None:
    """Add `plan` and `profile` to the `disagfusion` parser."""
    _register_plan(sub)
    _register_profile(sub)


def _register_plan(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="instances per stage for a GPU budget or a request rate",
        description="Replicas and accelerator per stage, throughput, bottleneck and cost\n"
        f"({CURRENCY} per hour) for a GPU budget (most throughput) or a request rate"
        " (lowest cost).",
        formatter_class=HelpFormatter,
    )
    one_line_errors(p)
    p.add_argument(
        "--profile",
        required=True,
        metavar="P",
        help="performance profile: a .yaml/.json file or builtin:NAME (required;"
        " see profile --list)",
    )
    goal = p.add_mutually_exclusive_group()
    goal.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="GPU budget to maximise throughput for (default: the profile's defaults.gpus)",
    )
    goal.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="requests/s to carry at the lowest cost (default: none; plan for --gpus)",
    )
    p.add_argument(
        "--trace",
        metavar="T",
        help="plan for the shape mix of this JSONL trace or builtin:NAME trace"
        " (default: the profile's default request)",
    )
    p.add_argument(
        "--slo", help="latency SLO for --rate, '30s' or '2x' (default: the profile's defaults.slo)"
    )
    p.add_argument(
        "--target-utilization",
        type=float,
        default=0.8,
        metavar="U",
        help="with --rate: the busy share each stage may run at",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        metavar="N",
        help="the most requests one call of any stage may hold, as the workers' limit"
        " (1: no batching; default: each stage's max_batch in the profile)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def _register_profile(sub: Any) -> None:
    m = sub.add_parser(
        "profile",
        help="measure a model's stages here, or show a builtin profile",
        description="Measure each stage of a model on this machine and fit a performance\n"
        "profile, or print the builtin profiles.",
        formatter_class=HelpFormatter,
    )
    one_line_errors(m)
    what = m.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--model",
        metavar="M",
        help="measure this model (builtin:tiny-unet, a diffusers directory, a cached hub id);"
        " one of --model, --show, --list is required",
    )
    what.add_argument(
        "--show",
        metavar="builtin:NAME",
        help="print a builtin profile; one of --model, --show, --list is required",
    )
    what.add_argument(
        "--list",
        action="store_true",
        help="list the builtin profiles; one of --model, --show, --list is required",
    )
    m.add_argument(
        "--json",
        action="store_true",
        help="print the profile as JSON on stdout (default: YAML on stdout unless -o is given)",
    )
    m.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write the profile: YAML if .yaml/.yml, else JSON (default: print it on stdout)",
    )
    m.add_argument("--device", default="cpu", help="torch device to measure on (cpu, cuda, ...)")
    m.add_argument(
        "--dtype",
        default=None,
        help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 otherwise)",
    )
    m.add_argument(
        "--repeats", type=int, default=5, metavar="N", help="timed runs per shape (fastest wins)"
    )
    m.add_argument("--quick", action="store_true", help="measure fewer, smaller shapes")
    m.add_argument(
        "--batch-sizes",
        default="1,2,4,8",
        metavar="B,B",
        help="batch sizes to time each stage at on the default request, for the profile's"
        " batch term (1: no batch term)",
    )
    m.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads, as a worker's --threads (default: 1 on CPU)",
    )
    m.set_defaults(func=cmd_profile)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        profile = load_profile(args.profile)
    except ProfileError as err:
        return _error(f"profile {args.profile}: {err}")
    try:
        if args.max_batch is not None:
            profile = with_max_batch(profile, args.max_batch)
        plan, goal = _make_plan(args, profile)
    except ValueError as err:
        return _error(str(err))
    if args.json:
        doc = {**plan.to_json(), "currency": CURRENCY}
        print(json.dumps(round_floats(doc), indent=2))
    else:
        _print_plan(plan, f"plan for {profile.name}, {goal}")
    return 0


def _make_plan(args: argparse.Namespace, profile: Profile) -> tuple[Plan, str]:
    """The plan the flags ask for and what it was planned for (ValueError: why not)."""
    # A stage may run on several accelerator types at once (one type: the planner's plan).
    from disagfusion.scheduling.pools import plan_pools_for_gpus
    from disagfusion.scheduling.pools_rate import plan_pools_for_rate

    mix = load_mix(args.trace, profile, args.gpus) if args.trace else None
    if args.rate is not None:
        plan = plan_pools_for_rate(profile, args.rate, mix, args.slo, args.target_utilization)
        _check_carries(plan, args.rate, args.target_utilization)
        return plan, f"{args.rate:g} req/s"
    gpus = args.gpus if args.gpus is not None else profile.default_gpus
    if gpus is None:
        raise ValueError(f"give --gpus or --rate ({profile.name} has no default budget)")
    if not len(STAGES) <= gpus <= MAX_GPUS:
        raise ValueError(
            f"--gpus must be at least {len(STAGES)} (one per stage) and at most {MAX_GPUS:,},"
            f" got {gpus}"
        )
    return plan_pools_for_gpus(profile, gpus, mix), f"{gpus} GPUs"


def _check_carries(plan: Plan, rate: float, utilization: float) -> None:
    """The planner caps a stage's instances (capacity.servers_for's limit): say so rather
    than print a plan that does not carry the rate (a stage of several pools: its
    service_time_s is replicas / throughput, so the check holds for their sum)."""
    for name, s in plan.stages.items():
        # A batching stage runs near busy by design (its headroom is the larger batch).
        busy = utilization if s.batch == 1 else 1.0
        if rate * s.service_time_s > s.replicas * busy * (1 + 1e-9):
            raise ValueError(
                f"cannot carry {rate:g} req/s: the {name} stage would need more than"
                f" {s.replicas:,} instances"
            )


def _print_plan(plan: Plan, heading: str) -> None:
    print(heading)
    batching = any(s.max_batch > 1 for s in plan.stages.values())
    batch_head = f"{'batch':>8}" if batching else ""
    # The stage total in the replicas column; several pools read "32 H100 + 29 L40S".
    where = {
        name: " + ".join(f"{p.replicas} {p.accelerator}" for p in s.pools)
        if len(s.pools) > 1
        else s.accelerator
        for name, s in plan.stages.items()
    }
    width = max(14, *(len(w) + 2 for w in where.values()))
    print(
        f"{'stage':<10}{'replicas':>9}  {'accelerator':<{width}}{'GPUs/inst':>9}{'req/s':>12}"
        + batch_head
    )
    for name, s in plan.stages.items():
        rps = plain_number(s.throughput_rps)
        batch = f"{f'{s.batch}/{s.max_batch}':>8}" if batching else ""
        per = "/".join(dict.fromkeys(str(p.gpus_per_instance) for p in (s.pools or (s,))))
        print(f"{name:<10}{s.replicas:>9}  {where[name]:<{width}}{per:>9}{rps:>12}" + batch)
    print(
        f"throughput {plain_number(plan.throughput_rps)} req/s, {plan.gpus} GPUs, "
        f"cost {money(plan.cost_per_hour)}, bottleneck {plan.bottleneck}"
    )


def _dump(data: dict[str, Any], path: str | None = None) -> str:
    if path and Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        return str(yaml.safe_dump(data, sort_keys=False))
    return json.dumps(data, indent=2) + "\n"


def cmd_profile(args: argparse.Namespace) -> int:
    if args.list:
        for name, data in BUILTIN_PROFILES.items():
            print(f"{BUILTIN_PREFIX}{name:<24} {data.get('description', '')}")
        return 0
    if args.show:
        if not args.show.startswith(BUILTIN_PREFIX):
            return _error(f"--show takes builtin:NAME, got {args.show!r}")
        try:
            data = profile_to_dict(load_profile(args.show))
        except ProfileError as err:
            return _error(str(err))
    else:
        if args.repeats < 1 or (args.threads is not None and args.threads < 1):
            return _error("--repeats and --threads must be >= 1")
        require_extra("worker")
        from disagfusion.worker.local.profiler import parse_batch_sizes, profile_model

        try:
            data = profile_model(
                args.model,
                args.device,
                args.repeats,
                args.quick,
                args.dtype,
                args.threads,
                batch_sizes=parse_batch_sizes(args.batch_sizes),
            )
        except (ValueError, RuntimeError) as err:  # bad model/device/dtype
            return _error(str(err))
    if args.output:
        try:
            Path(args.output).write_text(_dump(data, args.output))
        except OSError as err:
            return _error(f"cannot write {args.output}: {err.strerror or err}")
        print(f"wrote {args.output}", file=sys.stderr)
    if args.json or not args.output:
        print(_dump(data, None if args.json else "stdout.yaml"), end="")
    return 0
