"""Performance profiles: what each stage costs per request shape and accelerator (pure).

A profile says, per stage and accelerator, how long one request takes:

    seconds = a + b·P + c·P·steps + d·P²·steps,   P = width·height·frames / 10⁶

`a` is fixed overhead (a text encoder's cost does not depend on the image),
`b` scales with pixels (VAE decoding), `c` with pixels·steps (the DiT's
linear layers) and `d` with pixels²·steps (attention over all tokens).

A stage may also run several requests in one call. Its optional `batch` term
gives t(B)/t(1) at measured batch sizes B (`batch: {"2": 1.1, "4": 1.6}`),
and `max_batch` the most requests one call may hold (default: the largest
measured B; 1 turns batching off). How big a batch gets depends on the load:
`batch_at_rate`. The planner, the policies and the simulator all read service
times from here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from disagfusion.scheduling.stages import STAGES, stages_in

COEFFICIENTS = ("a", "b", "c", "d")
FIELDS = (*COEFFICIENTS, "memory_gb")
DEFAULT_SLO = "2x"  # the SLO a policy or simulation assumes when neither it nor the profile has one


class ProfileError(ValueError):
    """A profile that cannot be used; `problems` name the fields."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, order=True)
class RequestShape:
    width: int = 1024
    height: int = 1024
    frames: int = 1
    steps: int = 30

    @property
    def megapixels(self) -> float:
        """P: pixels of all frames, in millions."""
        return self.width * self.height * self.frames / 1e6

    def label(self) -> str:
        frames = f"x{self.frames}f" if self.frames > 1 else ""
        return f"{self.width}x{self.height}{frames}@{self.steps}"


@dataclass(frozen=True)
class Accelerator:
    name: str
    cost_per_hour: float = 0.0
    memory_gb: float = 80.0
    count: int | None = None  # how many the cluster has; None: only the GPU budget limits


# Batching: one call with B requests of a shape takes t(B) = t(1)·batch_factor(B).
# A profile gives the factor at a few measured sizes ({"2": 1.1, "4": 1.6}), per stage
# and accelerator, measured at the profile's default request (the gain shrinks as the
# request grows: a large image already fills the GPU); `max_batch` is the most
# requests one call may hold. No term, or max_batch 1: every request runs alone.
BatchTerm = tuple[tuple[int, float], ...]  # ((B, t(B)/t(1)), ...), B ascending, from B=2


def batch_factor(term: BatchTerm, size: int) -> float:
    """t(B)/t(1): how much longer one call with `size` requests takes than one with
    a single request. Piecewise linear through (1, 1) and the term's points; past
    the last point the throughput stays at the last point's (factor ∝ B): a gain
    nobody measured is not assumed. No term: B (no gain)."""
    if size <= 1:
        return 1.0
    points = ((1, 1.0), *term)
    for (b0, f0), (b1, f1) in itertools.pairwise(points):
        if size <= b1:
            return f0 + (f1 - f0) * (size - b0) / (b1 - b0)
    last_size, last_factor = points[-1]
    return last_factor * size / last_size


def batch_at_rate(arrival_rps: float, seconds: float, term: BatchTerm, max_batch: int) -> int:
    """The batch size one instance settles at when requests arrive at `arrival_rps`
    and a batch takes seconds·batch_factor(B): with no added wait, the next batch
    is what arrived during the last one, so the smallest B with λ·t(B) <= B.
    `max_batch` when even that does not keep up (the instance is overloaded)."""
    if arrival_rps <= 0 or seconds <= 0:
        return 1
    for size in range(1, max(1, max_batch) + 1):
        if arrival_rps * seconds * batch_factor(term, size) <= size:
            return size
    return max(1, max_batch)


def batched_rate(seconds: float, term: BatchTerm, size: int) -> float:
    """Requests per second one instance completes at batch `size`."""
    if seconds <= 0:
        return math.inf
    return size / (seconds * batch_factor(term, size))


def batch_capacity(seconds: float, term: BatchTerm, max_batch: int) -> tuple[float, int]:
    """(the most requests/s one instance completes at any batch up to `max_batch`, that
    batch): what it carries once its queue never empties."""
    rates = [(batched_rate(seconds, term, b), -b) for b in range(1, max(1, max_batch) + 1)]
    rate, size = max(rates)  # ties: the smaller batch (less latency for the same rate)
    return rate, -size


@dataclass(frozen=True)
class StageCost:
    """Service-time model of one stage on one accelerator."""

    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    d: float = 0.0
    memory_gb: float = 0.0
    batch: BatchTerm = ()  # measured batch factors; () = batch 1 only (no gain)
    max_batch: int = 1  # most requests per call; 1: no batching whatever the term says

    def seconds(self, shape: RequestShape) -> float:
        p = shape.megapixels
        return self.a + self.b * p + self.c * p * shape.steps + self.d * p * p * shape.steps

    def batch_seconds(self, shape: RequestShape, size: int) -> float:
        """One call with `size` requests of `shape`."""
        return self.seconds(shape) * batch_factor(self.batch, size)

    @property
    def batching(self) -> bool:
        """Whether running several requests per call can gain anything here: allowed
        (max_batch > 1) and measured (a batch term; without one a batch gains nothing)."""
        return self.max_batch > 1 and bool(self.batch)


@dataclass(frozen=True)
class Profile:
    name: str
    accelerators: tuple[Accelerator, ...]
    stages: Mapping[str, Mapping[str, StageCost]]  # stage -> accelerator name -> cost
    startup_seconds: float = 60.0
    default_request: RequestShape = RequestShape()
    handoff_seconds: float = 0.02  # per hop, added to latency (not to GPU time)
    default_gpus: int | None = None  # the GPU budget simulate/plan use when none is given
    default_slo: str | None = None  # "30s" or "2x"
    description: str = ""
    source: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def accelerator(self, name: str) -> Accelerator:
        for acc in self.accelerators:
            if acc.name == name:
                return acc
        raise KeyError(name)

    def accelerator_counts(self) -> dict[str, int | None]:
        """How many of each accelerator the cluster has (None: only the GPU budget limits)."""
        return {a.name: a.count for a in self.accelerators}

    def options(self, pool: str) -> tuple[str, ...]:
        """Accelerators a stage (or MONOLITHIC: every stage) can run on, in profile order."""
        parts = stages_in(pool)
        return tuple(
            a.name for a in self.accelerators if all(a.name in self.stages[s] for s in parts)
        )

    def default_accelerator(self, pool: str) -> str:
        return self.options(pool)[0]

    def service_time(self, stage: str, accelerator: str, shape: RequestShape) -> float:
        return self.stages[stage][accelerator].seconds(shape)

    def gpus_per_instance(self, pool: str, accelerator: str) -> int:
        """GPUs one instance needs to hold the weights of its stage, or of every stage
        for MONOLITHIC (at least one)."""
        need = sum(self.stages[s][accelerator].memory_gb for s in stages_in(pool))
        have = self.accelerator(accelerator).memory_gb
        return max(1, math.ceil(need / have)) if have > 0 else 1

    def slo_or_default(self, slo: str | None) -> str:
        """`slo` if given, else the profile's default, else DEFAULT_SLO."""
        return slo or self.default_slo or DEFAULT_SLO

    def unloaded_latency(self, shape: RequestShape, accelerators: Mapping[str, str]) -> float:
        """End-to-end seconds of one request on an idle pipeline (the slowdown SLO's base)."""
        compute = sum(self.service_time(s, accelerators[s], shape) for s in STAGES)
        return compute + self.handoff_seconds * (len(STAGES) - 1)


def _number(
    problems: list[str], data: Mapping[str, Any], key: str, path: str, default: float
) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        problems.append(f"{path}.{key}: must be a number")
        return default
    if value < 0:
        problems.append(f"{path}.{key}: must be >= 0, got {value}")
        return default
    return float(value)


def parse_shape(data: Any, path: str, problems: list[str]) -> RequestShape:
    if not isinstance(data, Mapping):
        problems.append(f"{path}: must be an object with width, height, frames, steps")
        return RequestShape()
    unknown = sorted(set(data) - {"width", "height", "frames", "steps", "t"})
    if unknown:
        problems.append(f"{path}: unknown field(s) {', '.join(unknown)}")
    values: dict[str, int] = {}
    for key, default in (("width", 1024), ("height", 1024), ("frames", 1), ("steps", 30)):
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{path}.{key}: must be an integer >= 1, got {value!r}")
            value = default
        values[key] = value
    return RequestShape(**values)


def parse_batch_term(data: Any, path: str, problems: list[str]) -> BatchTerm:
    """{"2": 1.1, "4": 1.6} (batch size -> t(B)/t(1)) -> ((2, 1.1), (4, 1.6)).

    Factors must not fall as B grows, and a batch may not be slower than its
    requests one by one (factor <= B)."""
    if not isinstance(data, Mapping):
        problems.append(f'{path}: must map batch sizes to time factors, like {{"4": 1.6}}')
        return ()
    points: list[tuple[int, float]] = []
    for key, value in data.items():
        try:
            size = int(key)
        except (TypeError, ValueError):
            size = 0
        if size < 2 or str(size) != str(key).strip():
            problems.append(f"{path}.{key}: a batch size must be an integer >= 2")
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            problems.append(f"{path}.{key}: must be a number")
            continue
        if not 1.0 <= value <= size:
            problems.append(f"{path}.{key}: a factor must be in 1..{size}, got {value}")
            continue
        points.append((size, float(value)))
    points.sort()
    for (b0, f0), (b1, f1) in itertools.pairwise(points):
        if f1 < f0:
            problems.append(f"{path}: the factor at {b1} ({f1}) is below the one at {b0} ({f0})")
    return tuple(points)


def default_max_batch(term: BatchTerm) -> int:
    """A file's `max_batch` when it gives none: the largest batch it measured (1 if none)."""
    return term[-1][0] if term else 1


def _max_batch(value: Any, term: BatchTerm, path: str, problems: list[str]) -> int:
    if value is None:
        return default_max_batch(term)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{path}.max_batch: must be an integer >= 1, got {value!r}")
        return 1
    return value


def with_max_batch(profile: Profile, max_batch: int) -> Profile:
    """`profile` with every stage's batch limit set to `max_batch` (1: no batching), as
    when the serving runtime is started with that limit."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max batch must be an integer >= 1, got {max_batch!r}")
    stages = {
        stage: {acc: replace(cost, max_batch=max_batch) for acc, cost in per_acc.items()}
        for stage, per_acc in profile.stages.items()
    }
    return replace(profile, stages=stages)


def with_stage_types(profile: Profile, allowed: Mapping[str, Iterable[str]]) -> Profile:
    """`profile` with the stages named in `allowed` kept to those accelerator types (a
    deployment's pools): a policy then only plans pools the cluster declared. A type
    the stage's costs do not list is ignored; a stage left with none keeps them all."""
    stages = dict(profile.stages)
    for stage, names in allowed.items():
        kept = {a: c for a, c in profile.stages[stage].items() if a in set(names)}
        if kept:
            stages[stage] = kept
    return replace(profile, stages=stages)


def parse_slo(text: str) -> tuple[str, float]:
    """'30s' -> ('seconds', 30.0); '2x' -> ('slowdown', 2.0). ValueError names the problem."""
    raw = text.strip().lower()
    kind = {"s": "seconds", "x": "slowdown"}.get(raw[-1:]) if raw else None
    try:
        value = float(raw[:-1]) if kind else float("nan")
    except ValueError:
        value = float("nan")
    if kind is None or not math.isfinite(value) or value <= 0:
        raise ValueError(f"SLO {text!r}: use seconds like '30s' or a slowdown like '2x'")
    if kind == "slowdown" and value < 1:
        raise ValueError(f"SLO {text!r}: a slowdown must be >= 1x")
    return kind, value


def parse_profile(data: Any, name: str = "") -> Profile:
    """Validate a profile (the parsed YAML/JSON); ProfileError lists every problem."""
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise ProfileError(["profile: must be an object"])
    name = str(data.get("name") or name or "profile")
    accelerators: list[Accelerator] = []
    raw_accs = data.get("accelerators")
    if not isinstance(raw_accs, list) or not raw_accs:
        problems.append(
            "accelerators: must be a non-empty list of {name, cost_per_hour, memory_gb}"
        )
        raw_accs = []
    for i, acc in enumerate(raw_accs):
        path = f"accelerators[{i}]"
        if not isinstance(acc, Mapping) or not isinstance(acc.get("name"), str):
            problems.append(f"{path}: must be an object with a string name")
            continue
        count = acc.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            problems.append(f"{path}.count: must be an integer")
            count = None
        accelerators.append(
            Accelerator(
                name=acc["name"],
                cost_per_hour=_number(problems, acc, "cost_per_hour", path, 0.0),
                memory_gb=_number(problems, acc, "memory_gb", path, 80.0),
                count=count,
            )
        )
    names = [a.name for a in accelerators]
    if len(set(names)) != len(names):
        problems.append("accelerators: names must be unique")
    stages: dict[str, dict[str, StageCost]] = {}
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, Mapping):
        problems.append("stages: must map encoder, denoiser and decoder to per-accelerator costs")
        raw_stages = {}
    for extra in sorted(set(raw_stages) - set(STAGES)):
        problems.append(f"stages.{extra}: unknown stage (use {', '.join(STAGES)})")
    for stage in STAGES:
        per_acc = raw_stages.get(stage)
        if not isinstance(per_acc, Mapping) or not per_acc:
            problems.append(f"stages.{stage}: required, a map of accelerator name to coefficients")
            continue
        stages[stage] = {}
        for acc_name, coeffs in per_acc.items():
            path = f"stages.{stage}.{acc_name}"
            if acc_name not in names:
                problems.append(f"{path}: accelerator {acc_name!r} is not in accelerators")
                continue
            if not isinstance(coeffs, Mapping):
                problems.append(f"{path}: must be an object with a, b, c, d, memory_gb")
                continue
            unknown = sorted(set(coeffs) - {*COEFFICIENTS, "memory_gb", "batch", "max_batch"})
            if unknown:
                problems.append(f"{path}: unknown field(s) {', '.join(unknown)}")
            term = parse_batch_term(coeffs.get("batch", {}), f"{path}.batch", problems)
            stages[stage][acc_name] = StageCost(
                **{
                    k: _number(problems, coeffs, k, path, 0.0) for k in (*COEFFICIENTS, "memory_gb")
                },
                batch=term,
                max_batch=_max_batch(coeffs.get("max_batch"), term, path, problems),
            )
    default_request = parse_shape(data.get("default_request", {}), "default_request", problems)
    startup = _number(problems, data, "startup_seconds", "profile", 60.0)
    handoff = _number(problems, data, "handoff_seconds", "profile", 0.02)
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        problems.append("defaults: must be an object with gpus and slo")
        defaults = {}
    gpus = defaults.get("gpus")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 3):
        problems.append(f"defaults.gpus: must be an integer >= 3 (one per stage), got {gpus!r}")
        gpus = None
    slo = defaults.get("slo")
    if slo is not None:
        try:
            parse_slo(str(slo))
        except ValueError as err:
            problems.append(f"defaults.slo: {err}")
            slo = None
    if problems:
        raise ProfileError(problems)
    return Profile(
        name=name,
        accelerators=tuple(accelerators),
        stages=stages,
        startup_seconds=startup,
        default_request=default_request,
        handoff_seconds=handoff,
        default_gpus=gpus,
        default_slo=str(slo) if slo is not None else None,
        description=str(data.get("description") or ""),
        source=str(data.get("source") or ""),
    )


def profile_to_dict(profile: Profile) -> dict[str, Any]:
    """The file form of a profile (what `disagfusion profile` writes)."""
    out: dict[str, Any] = {
        "name": profile.name,
        "description": profile.description,
        "source": profile.source,
        "accelerators": [
            {
                "name": a.name,
                "cost_per_hour": a.cost_per_hour,
                "memory_gb": a.memory_gb,
                **({"count": a.count} if a.count is not None else {}),
            }
            for a in profile.accelerators
        ],
        "startup_seconds": profile.startup_seconds,
        "handoff_seconds": profile.handoff_seconds,
        "default_request": {
            "width": profile.default_request.width,
            "height": profile.default_request.height,
            "frames": profile.default_request.frames,
            "steps": profile.default_request.steps,
        },
        "stages": {
            stage: {acc: _cost_to_dict(cost) for acc, cost in per_acc.items()}
            for stage, per_acc in profile.stages.items()
        },
    }
    defaults = {
        k: v for k, v in (("gpus", profile.default_gpus), ("slo", profile.default_slo)) if v
    }
    if defaults:
        out["defaults"] = defaults
    return out


def _cost_to_dict(cost: StageCost) -> dict[str, Any]:
    out: dict[str, Any] = {
        k: getattr(cost, k) for k in (*COEFFICIENTS, "memory_gb") if getattr(cost, k)
    }
    if cost.batch:
        out["batch"] = {str(size): factor for size, factor in cost.batch}
    if cost.max_batch != default_max_batch(cost.batch):
        out["max_batch"] = cost.max_batch
    return out
