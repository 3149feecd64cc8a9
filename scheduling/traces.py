"""Request traces: JSONL files, one request a line (pure parsing).

    {"t": seconds, "width": px, "height": px, "frames": n, "steps": n}

`t` is the arrival time in seconds from the start of the trace; lines must
be in time order. Missing shape fields take the profile's default request.

Builtin traces (`BUILTIN_TRACES`, `builtin_trace`) are relative to a profile
and a GPU budget: their shapes derive from the profile's default request and
their rates are fractions of the throughput the budget can serve (the
planner's `plan_for_gpus`), so the same trace name means "60 % load" for a
video model on 96 GPUs and for an image model on 64.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from disagfusion.scheduling.builtin_profiles import BUILTIN_PREFIX
from disagfusion.scheduling.profile import Profile, RequestShape


class TraceError(ValueError):
    """A trace line that cannot be used; the message names the line."""


@dataclass(frozen=True)
class TraceRequest:
    t: float
    shape: RequestShape


def parse_trace_lines(lines: Iterable[str], default: RequestShape) -> list[TraceRequest]:
    """Parse JSONL lines; blank lines are skipped. TraceError names the first bad line."""
    out: list[TraceRequest] = []
    last_t = 0.0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TraceError(f"line {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise TraceError(f"line {number}: must be a JSON object")
        t = row.get("t")
        if isinstance(t, bool) or not isinstance(t, int | float) or t < 0 or t != t:
            raise TraceError(f"line {number}: 't' must be a number of seconds >= 0")
        if t < last_t:
            raise TraceError(f"line {number}: t={t} is before the previous line's t={last_t}")
        unknown = sorted(set(row) - {"t", "width", "height", "frames", "steps"})
        if unknown:
            raise TraceError(f"line {number}: unknown field(s) {', '.join(unknown)}")
        fields = {}
        for key in ("width", "height", "frames", "steps"):
            value = row.get(key, getattr(default, key))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TraceError(f"line {number}: {key!r} must be an integer >= 1, got {value!r}")
            fields[key] = value
        out.append(TraceRequest(float(t), RequestShape(**fields)))
        last_t = float(t)
    return out


def trace_to_lines(requests: Iterable[TraceRequest]) -> Iterable[str]:
    for r in requests:
        s = r.shape
        yield json.dumps(
            {
                "t": round(r.t, 6),
                "width": s.width,
                "height": s.height,
                "frames": s.frames,
                "steps": s.steps,
            }
        )


def shape_mix(requests: Iterable[TraceRequest]) -> tuple[tuple[RequestShape, float], ...]:
    """Each distinct shape with its share of the requests, most common first."""
    counts = Counter(r.shape for r in requests)
    total = sum(counts.values())
    if not total:
        return ()
    return tuple((shape, n / total) for shape, n in counts.most_common())


# Builtin traces. Absolute rates and shapes only mean something for a given model and
# GPU budget, so every builtin trace is defined RELATIVE to a profile: shapes derive
# from profile.default_request, and rates are fractions of what the budget can serve
# (planner.plan_for_gpus's throughput for the trace's mix).
BUILTIN_TRACES: dict[str, str] = {
    "steady": "2 h of Poisson arrivals at 0.6x the budget's capacity, default request",
    "burst": "3 h at 0.35x capacity with two 15-min bursts to 0.8x (10-min ramps), default request",
    "diurnal": "24 h sinusoid between 0.15x and 0.7x capacity, Poisson arrivals, default request",
    "mix-shift": "4 h: the heavy share moves 10% -> 90% from light requests (steps/6, one frame)"
    " to the default request; the rate keeps the offered GPU work at 0.55x capacity",
    "mixed-light-heavy": "2 h of Poisson arrivals, 85% light (half size, steps/6, one frame)"
    " and 15% the default request, at 0.55x capacity; meant for a 3x slowdown SLO",
}
# The SLO a builtin trace is meant for, where it has one (`disagfusion simulate` uses it
# when --slo is not given): a slowdown SLO makes a light request's deadline tight.
BUILTIN_TRACE_SLOS: dict[str, str] = {"mixed-light-heavy": "3x"}
MIXED_HEAVY_SHARE = 0.15
_MIX_GRID = 16  # mix-shift: capacity is computed at this many heavy shares, then interpolated


def light_shape(default: RequestShape) -> RequestShape:
    """mix-shift's light request: a few-step image (one frame) of the default size."""
    return RequestShape(default.width, default.height, 1, max(1, default.steps // 6))


def small_light_shape(default: RequestShape) -> RequestShape:
    """mixed-light-heavy's light request: a few-step image at half the default's sides."""
    return RequestShape(
        max(1, default.width // 2), max(1, default.height // 2), 1, max(1, default.steps // 6)
    )


def _capacity_rps(
    profile: Profile, gpus: int, mix: tuple[tuple[RequestShape, float], ...]
) -> float:
    from disagfusion.scheduling.planner import plan_for_gpus  # pure; lazy to keep import light

    return plan_for_gpus(profile, gpus, mix).throughput_rps


def _poisson(
    rng: random.Random,
    duration_s: float,
    rate: Callable[[float], float],
    peak: float,
    shape: Callable[[float, float], RequestShape],
) -> list[TraceRequest]:
    """Non-homogeneous Poisson arrivals by thinning against the peak rate."""
    out: list[TraceRequest] = []
    t = 0.0
    while peak > 0:
        t += rng.expovariate(peak)
        if t >= duration_s:
            break
        if rng.random() * peak <= rate(t):
            out.append(TraceRequest(t, shape(t, rng.random())))
    return out


BURST_RAMP_S = 600.0


def _ramp(t: float, start: float, end: float, ramp_s: float) -> float:
    """0 before start, 1 between start+ramp and end, linear ramps at both edges."""
    if t <= start or t >= end + ramp_s:
        return 0.0
    if t < start + ramp_s:
        return (t - start) / ramp_s
    return 1.0 if t <= end else 1.0 - (t - end) / ramp_s


def builtin_trace(
    name: str,
    profile: Profile,
    gpus: int | None = None,
    seed: int = 0,
    requests: int | None = None,
    load: float = 1.0,
) -> list[TraceRequest]:
    """A builtin trace for `profile` and `gpus` (default: the profile's budget).

    Deterministic for a seed. `requests` rescales the rate to give about that many
    requests (for speed benchmarks); the shape of the load over time is kept.
    `load` multiplies the rate (after `requests`): capacities are those of one
    accelerator type per stage, and a heterogeneous pool may carry more.
    KeyError names the known traces; ValueError when no budget is known.
    """
    if name not in BUILTIN_TRACES:
        known = ", ".join(BUILTIN_TRACES)
        raise KeyError(f"unknown trace {BUILTIN_PREFIX}{name} (known: {known})")
    budget = gpus or profile.default_gpus
    if budget is None:
        raise ValueError(f"profile {profile.name} has no default GPU budget: give one")
    heavy = profile.default_request
    light = light_shape(heavy)
    rng = random.Random(f"{name}:{seed}")  # str seeds are hashed deterministically
    fixed: Callable[[float, float], RequestShape] = lambda _t, _u: heavy  # noqa: E731
    shape = fixed
    if name == "mix-shift":
        duration = 4 * 3600.0

        def share(t: float) -> float:
            return 0.1 + 0.8 * t / duration

        grid = [i / _MIX_GRID for i in range(_MIX_GRID + 1)]
        caps = [_capacity_rps(profile, budget, ((light, 1 - h), (heavy, h))) for h in grid]

        def rate(t: float) -> float:
            x = share(t) * _MIX_GRID
            i = min(int(x), _MIX_GRID - 1)
            return 0.55 * (caps[i] + (caps[i + 1] - caps[i]) * (x - i))

        def shape(t: float, u: float) -> RequestShape:
            return heavy if u < share(t) else light

    elif name == "mixed-light-heavy":
        duration = 2 * 3600.0
        small = small_light_shape(heavy)
        mixed = _capacity_rps(
            profile, budget, ((small, 1 - MIXED_HEAVY_SHARE), (heavy, MIXED_HEAVY_SHARE))
        )

        def rate(t: float) -> float:
            return 0.55 * mixed

        def shape(t: float, u: float) -> RequestShape:
            return heavy if u < MIXED_HEAVY_SHARE else small

    else:
        cap = _capacity_rps(profile, budget, ((heavy, 1.0),))
        if name == "steady":
            duration = 2 * 3600.0

            def rate(t: float) -> float:
                return 0.6 * cap

        elif name == "burst":
            duration = 3 * 3600.0
            # 15 min at the peak each. The ramps (10 min) are slower than a pod starts:
            # a step faster than start-up can only be met by idle headroom.
            bursts = ((3600.0, 4500.0), (7200.0, 8100.0))

            def rate(t: float) -> float:
                lift = max(_ramp(t, s - BURST_RAMP_S, e, BURST_RAMP_S) for s, e in bursts)
                return cap * (0.35 + 0.45 * lift)

        else:  # diurnal: trough at t=0 (night), peak at 12 h
            duration = 24 * 3600.0

            def rate(t: float) -> float:
                return cap * (0.425 - 0.275 * math.cos(2 * math.pi * t / duration))

    steps = 2000
    grid_rates = [rate((i + 0.5) * duration / steps) for i in range(steps)]
    scale = 1.0
    if requests is not None:
        expected = sum(grid_rates) * duration / steps
        scale = requests / expected if expected > 0 else 1.0
    if not (load > 0 and math.isfinite(load)):
        raise ValueError(f"load must be a positive number, got {load}")
    scale *= load
    peak = max(grid_rates) * scale * 1.05  # the grid may miss the exact peak
    return _poisson(rng, duration, lambda t: rate(t) * scale, peak, shape)
