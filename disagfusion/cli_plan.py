"""`disagfusion plan` (instances per stage for a budget or a rate) and `disagfusion profile`
(measure a model's stages here, or show a builtin profile)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from disagfusion.operator.profile import (
    STAGES,
    Profile,
    ProfileError,
    RequestShape,
    parse_profile,
    profile_to_dict,
)

BUILTIN = "builtin:"


def load_profile(spec: str) -> Profile:
    """`builtin:NAME` or a .yaml/.yml/.json file; ProfileError says what is wrong
    (callers name `spec` when they print it)."""
    if spec.startswith(BUILTIN):
        from disagfusion.operator.builtin_profiles import builtin_profile

        try:
            return builtin_profile(spec.removeprefix(BUILTIN))
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
            raise ProfileError([f"not valid YAML: {err}"]) from None
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
    from disagfusion.operator.traces import parse_trace_lines, shape_mix

    if spec.startswith(BUILTIN):
        try:
            from disagfusion.operator.traces import builtin_trace

            requests = builtin_trace(spec.removeprefix(BUILTIN), profile, gpus)
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
    p = sub.add_parser("plan", help="instances per stage for a GPU budget or a request rate")
    p.add_argument("--profile", required=True, help="profile file (.yaml/.json) or builtin:NAME")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--gpus", type=int, help="GPU budget: maximise throughput")
    goal.add_argument("--rate", type=float, help="requests/s to carry: minimise cost")
    p.add_argument("--trace", help="JSONL trace (or builtin:NAME) whose shape mix to plan for")
    p.add_argument("--slo", help="latency SLO for --rate: '30s' or '2x' (default: the profile's)")
    p.add_argument("--target-utilization", type=float, default=0.8, help="busy share (--rate)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    m = sub.add_parser("profile", help="measure a model's stages here, or show a builtin profile")
    what = m.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="model to measure (builtin:tiny-unet, a diffusers dir, ...)")
    what.add_argument("--show", metavar="builtin:NAME", help="print a builtin profile")
    what.add_argument("--list", action="store_true", help="list the builtin profiles")
    m.add_argument("--json", action="store_true", help="print the profile as JSON on stdout")
    m.add_argument("-o", "--output", help="write the profile (YAML if .yaml/.yml, else JSON)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    m.add_argument("--repeats", type=int, default=5, help="timed runs per shape (fastest wins)")
    m.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    m.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads, as the workers' (default: 1)"
    )
    m.set_defaults(func=cmd_profile)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def cmd_plan(args: argparse.Namespace) -> int:
    from disagfusion.operator.planner import plan_for_gpus, plan_for_rate

    try:
        profile = load_profile(args.profile)
    except ProfileError as err:
        return _error(f"profile {args.profile}: {err}")
    try:
        mix = load_mix(args.trace, profile, args.gpus) if args.trace else None
        if args.rate is not None:
            plan = plan_for_rate(profile, args.rate, mix, args.slo, args.target_utilization)
            goal = f"{args.rate:g} req/s"
        else:
            gpus = args.gpus if args.gpus is not None else profile.default_gpus
            if gpus is None:
                return _error(f"give --gpus or --rate ({profile.name} has no default budget)")
            if gpus < len(STAGES):
                return _error(f"--gpus must be at least {len(STAGES)} (one per stage), got {gpus}")
            plan = plan_for_gpus(profile, gpus, mix)
            goal = f"{gpus} GPUs"
    except ValueError as err:
        return _error(str(err))
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    print(f"plan for {profile.name}, {goal}")
    print(f"{'stage':<10}{'replicas':>9}  {'accelerator':<14}{'GPUs/inst':>9}{'req/s':>12}")
    for name, s in plan.stages.items():
        rps = f"{s.throughput_rps:.4g}"
        print(f"{name:<10}{s.replicas:>9}  {s.accelerator:<14}{s.gpus_per_instance:>9}{rps:>12}")
    print(
        f"throughput {plan.throughput_rps:.4g} req/s, {plan.gpus} GPUs, "
        f"{plan.cost_per_hour:.2f}/h, bottleneck {plan.bottleneck}"
    )
    return 0


def _dump(data: dict[str, Any], path: str | None = None) -> str:
    if path and Path(path).suffix.lower() in (".yaml", ".yml"):
        import yaml

        return str(yaml.safe_dump(data, sort_keys=False))
    return json.dumps(data, indent=2) + "\n"


def cmd_profile(args: argparse.Namespace) -> int:
    if args.list:
        from disagfusion.operator.builtin_profiles import BUILTIN_PROFILES

        for name, data in BUILTIN_PROFILES.items():
            print(f"{BUILTIN}{name:<24} {data.get('description', '')}")
        return 0
    if args.show:
        if not args.show.startswith(BUILTIN):
            return _error(f"--show takes builtin:NAME, got {args.show!r}")
        try:
            data = profile_to_dict(load_profile(args.show))
        except ProfileError as err:
            return _error(str(err))
    else:
        if args.repeats < 1 or (args.threads is not None and args.threads < 1):
            return _error("--repeats and --threads must be >= 1")
        from disagfusion.worker.profiler import profile_model

        try:
            data = profile_model(
                args.model, args.device, args.repeats, args.quick, args.dtype, args.threads
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
