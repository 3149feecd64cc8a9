"""Measure each stage of a model on this machine and fit a performance profile.

Each stage is loaded alone (as a worker would), run on a few request shapes
after a warm-up, and timed: the fastest of the repeats, because on a shared
machine other processes only ever add time (a median still moves with them).
The coefficients of operator/profile.py's model are fitted by non-negative
least squares on relative error, so small and large shapes count alike:

    encoder: a          (the text encoder never sees the image size)
    decoder: a + b·P
    denoiser: a + c·P·steps + d·P²·steps

Then each stage runs batches of B = 1, 2, 4, 8 copies of the default request
(`StageModel.run_batch`), and t(B)/t(1) becomes the stage's batch term,
clamped to 1..B and made non-decreasing (noise must not promise a batch
that is slower than running alone, or a bigger batch that is cheaper).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from disagfusion.scheduling.profile import (
    STAGES,
    Profile,
    RequestShape,
    parse_profile,
    profile_to_dict,
)
from disagfusion.worker.models.loading import ModelInfo, describe_model
from disagfusion.worker.params import GenerationParams

PROMPT = "a photograph of a red fox in the snow"
BATCH_SIZES = (1, 2, 4, 8)  # batch sizes measured at the default request
# Which coefficients each stage's fit may use.
_TERMS: dict[str, tuple[str, ...]] = {
    "encoder": ("a",),
    "decoder": ("a", "b"),
    "denoiser": ("a", "c", "d"),
}


@dataclass(frozen=True)
class Measurement:
    stage: str
    shape: RequestShape
    seconds: float  # fastest of the repeats


def _features(term: str, shape: RequestShape) -> float:
    p, s = shape.megapixels, shape.steps
    return {"a": 1.0, "b": p, "c": p * s, "d": p * p * s}[term]


def nnls(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of columns, exactly.

    The optimum is the plain least-squares solution on some subset of the
    columns, so try every subset and keep the best non-negative one.
    """
    n = matrix.shape[1]
    norms = np.linalg.norm(matrix, axis=0)
    norms[norms == 0] = 1.0
    scaled = matrix / norms  # columns differ by orders of magnitude (P² vs 1)
    best, best_err = np.zeros(n), float(np.sum(target**2))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            sol = np.linalg.lstsq(scaled[:, cols], target, rcond=None)[0]
            if np.any(sol < 0):
                continue
            err = float(np.sum((scaled[:, cols] @ sol - target) ** 2))
            if err < best_err - 1e-15:
                best, best_err = np.zeros(n), err
                best[list(cols)] = sol
    return best / norms


def fit_stage(stage: str, measurements: Sequence[Measurement]) -> dict[str, float]:
    """Coefficients for one stage, minimising squared relative error."""
    terms = _TERMS[stage]
    rows = [m for m in measurements if m.stage == stage and m.seconds > 0]
    if not rows:
        return {}
    weights = np.array([1 / m.seconds for m in rows])
    matrix = np.array([[_features(t, m.shape) for t in terms] for m in rows]) * weights[:, None]
    coeffs = nnls(matrix, np.ones(len(rows)))
    return {t: float(f"{v:.6g}") for t, v in zip(terms, coeffs, strict=True) if v > 0}


def fit_batch_term(seconds: Mapping[int, float]) -> dict[str, float]:
    """Measured {B: t(B)} (B = 1 included) -> the profile's batch term {"B": t(B)/t(1)}:
    each factor clamped to 1..B, and never below a smaller batch's factor."""
    base = seconds.get(1, 0.0)
    if base <= 0:
        return {}
    term: dict[str, float] = {}
    floor = 1.0
    for size in sorted(b for b in seconds if b > 1):
        factor = min(max(seconds[size] / base, floor), float(size))
        floor = factor
        term[str(size)] = float(f"{factor:.4g}")
    return term


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,2,4,8' -> (1, 2, 4, 8); batch 1 is always measured (the base of the factors)."""
    try:
        sizes = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"--batch-sizes {text!r}: use integers like 1,2,4,8") from None
    if any(b < 1 for b in sizes):
        raise ValueError(f"--batch-sizes {text!r}: every batch size must be >= 1")
    return tuple(sorted(sizes | {1}))


def measurement_shapes(info: ModelInfo, quick: bool) -> list[RequestShape]:
    """Sizes of 1x, 2x (and 4x) the default area per side, at two step counts."""
    width, height = info.default_size
    multiple = info.size_multiple
    sizes: list[tuple[int, int]] = []
    for factor in (1, 2) if quick else (1, 2, 4):
        w = min(info.max_size, width * factor) // multiple * multiple
        h = min(info.max_size, height * factor) // multiple * multiple
        if (w, h) not in sizes:
            sizes.append((w, h))
    if len(sizes) < 2:  # the default is already the largest size: go smaller
        half = [max(multiple, side // 2 // multiple * multiple) for side in (width, height)]
        sizes.insert(0, (half[0], half[1]))
    d = info.default_steps
    steps = (max(1, d // 4), max(2, d // 2)) if quick else (max(1, d // 2), max(2, d))
    frames = info.default_frames  # a video model is measured at its default clip length
    return [
        RequestShape(w, h, frames, s) for (w, h), s in itertools.product(sizes, sorted(set(steps)))
    ]


def _accelerator(device: str) -> dict[str, Any]:
    import torch

    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        return {"name": torch.cuda.get_device_name(device), "memory_gb": props.total_memory // 1e9}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {"name": f"cpu-{os.cpu_count()}cores", "memory_gb": math.floor(ram)}


def _module_gb(stage: Any) -> float:
    import torch

    total = 0
    for module in stage.pipe.components.values():
        if isinstance(module, torch.nn.Module):
            tensors = itertools.chain(module.parameters(), module.buffers())
            total += sum(t.numel() * t.element_size() for t in tensors)
    return math.ceil(total / 1e6) / 1e3  # GB, rounded up to the megabyte


@dataclass
class _Run:
    measurements: list[Measurement]
    load_s: dict[str, float]  # per stage: weights from disk onto the device
    memory_gb: dict[str, float]
    batches: dict[str, dict[int, float]] = field(default_factory=dict)  # stage -> {B: t(B)}


def profile_model(
    model: str,
    device: str = "cpu",
    repeats: int = 5,
    quick: bool = False,
    dtype: str | None = None,
    threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> dict[str, Any]:
    """Measure `model` on `device`; the profile's file form plus the raw measurements.

    `batch_sizes` are the batches each stage is timed at on the default request
    (batch 1 is always among them; only (1,): no batch term).

    `threads` sets torch's CPU threads for the run, as a worker's --threads
    does. None means 1 on a CPU: `serve --local` splits the cores between its
    workers the same way, and oversubscribed threads on a busy machine stall
    each other (seconds per step instead of milliseconds).
    """
    start = time.perf_counter()
    import torch

    from disagfusion.worker.models.stages import load_stage

    import_s = time.perf_counter() - start  # part of a pod's start; 0 if already imported
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"device {device!r}: {err}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available here")
    info = describe_model(model, cache_dir=cache_dir)  # builds a builtin before any timing
    if threads is None and kind == "cpu":
        threads = 1
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        sizes = tuple(sorted({1, *batch_sizes}))
        run = _measure(info, load_stage, device, dtype, repeats, quick, cache_dir, log, sizes)
    finally:
        torch.set_num_threads(previous)
    accelerator = _accelerator(device)
    default = RequestShape(*info.default_size, info.default_frames, info.default_steps)
    data = {
        "name": f"{info.name}-{accelerator['name'].lower().replace(' ', '-')}",
        "description": f"{info.name} measured on {accelerator['name']} by disagfusion profile",
        "source": f"disagfusion profile --model {model} --device {device}"
        f"{f' --threads {threads}' if threads else ''} (fastest of {repeats} runs per shape"
        " after a warm-up)",
        "accelerators": [{"cost_per_hour": 0.0, **accelerator}],
        "startup_seconds": round(import_s + max(run.load_s.values()), 1),
        "default_request": _shape_dict(default),
        "stages": {
            s: {
                accelerator["name"]: {
                    **fit_stage(s, run.measurements),
                    "memory_gb": run.memory_gb[s],
                    **_batch_fields(run.batches.get(s, {})),
                }
            }
            for s in STAGES
        },
    }
    profile = parse_profile(data)  # validates what we write
    worst = max(run.measurements, key=lambda m: _error(profile, m))
    log(f"fit: worst error {_error(profile, worst):.0%} ({worst.stage} {worst.shape.label()})")
    if _error(profile, worst) > 0.5:
        log("warning: timings are noisy (a busy machine?): try more --repeats")
    out = profile_to_dict(profile)
    out["measurements"] = [
        {"stage": m.stage, **_shape_dict(m.shape), "seconds": round(m.seconds, 6)}
        for m in run.measurements
    ]
    if run.batches:
        out["batch_measurements"] = [
            {"stage": s, "batch": b, "seconds": round(t, 6)}
            for s, per in run.batches.items()
            for b, t in per.items()
        ]
    return out


def _batch_fields(seconds: Mapping[int, float]) -> dict[str, Any]:
    """The stage's batch term; `max_batch: 1` where no batch beat running alone."""
    term = fit_batch_term(seconds)
    if not term:
        return {}
    gains = any(factor < int(size) for size, factor in term.items())
    return {"batch": term} if gains else {"batch": term, "max_batch": 1}


def _measure(
    info: ModelInfo,
    load_stage: Callable[..., Any],
    device: str,
    dtype: str | None,
    repeats: int,
    quick: bool,
    cache_dir: str | os.PathLike[str] | None,
    log: Callable[[str], None],
    batch_sizes: Sequence[int] = (1,),
) -> _Run:
    import torch

    def elapsed(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    shapes = measurement_shapes(info, quick)
    run = _Run([], {}, {})
    embeds: dict[str, Any] = {}
    for name in STAGES:
        t0 = time.perf_counter()
        stage = load_stage(name, info.source, device=device, dtype=dtype, cache_dir=cache_dir)
        run.load_s[name] = time.perf_counter() - t0
        run.memory_gb[name] = _module_gb(stage)
        log(f"{name}: loaded in {run.load_s[name]:.2f} s")
        if name == "encoder":  # the encoder never sees the image size or step count
            todo = [RequestShape(*info.default_size, info.default_frames, info.default_steps)]
        elif name == "decoder":  # the decoder never sees the step count
            todo = [s for s in shapes if s.steps == shapes[0].steps]
        else:
            todo = shapes
        calls = []
        for shape in todo:
            params = _params(info, shape)
            if name == "encoder":
                embeds = stage.run(params, _encoder_inputs(stage, shape))  # also the warm-up
            inputs = {"encoder": _encoder_inputs(stage, shape), "denoiser": embeds}.get(name)
            if inputs is None:
                inputs = {"latents": _latents(stage, shape, device)}
            calls.append(functools.partial(stage.run, params, inputs))
            elapsed(calls[-1])  # warm-up: first-call allocations and kernel choices
        # Round-robin over the shapes, so a burst of load elsewhere hits one
        # sample of several shapes rather than every sample of one shape.
        samples = [[elapsed(call) for call in calls] for _ in range(repeats)]
        for i, shape in enumerate(todo):
            seconds = min(row[i] for row in samples)
            run.measurements.append(Measurement(name, shape, seconds))
            log(f"  {name} {shape.label()}: {seconds * 1e3:.1f} ms")
        if len(batch_sizes) > 1:
            per = _time_batches(stage, name, info, embeds, device, batch_sizes, repeats, elapsed)
            if per:
                run.batches[name] = per
            log(f"  {name} batches: " + _batch_line(per))
    return run


def _time_batches(
    stage: Any,
    name: str,
    info: ModelInfo,
    embeds: dict[str, Any],
    device: str,
    sizes: Sequence[int],
    repeats: int,
    elapsed: Callable[[Callable[[], Any]], float],
) -> dict[int, float]:
    """{B: fastest seconds of one run_batch call holding B copies of the default request};
    {} when the stage never batches (its batch key is None)."""
    shape = RequestShape(*info.default_size, info.default_frames, info.default_steps)
    params = _params(info, shape)
    inputs = _stage_inputs(stage, name, shape, embeds, device)
    if stage.batch_key(params, inputs) is None:
        return {}
    calls = {b: functools.partial(_run_batch, stage, [(params, inputs)] * b) for b in sizes}
    for call in calls.values():
        elapsed(call)  # warm-up: each batch size allocates and picks kernels anew
    samples = [{b: elapsed(call) for b, call in calls.items()} for _ in range(repeats)]
    return {b: min(row[b] for row in samples) for b in sizes}


def _run_batch(stage: Any, requests: list[tuple[GenerationParams, Any]]) -> None:
    for outcome in stage.run_batch(requests):
        if isinstance(outcome, Exception):
            raise RuntimeError(f"a batch of {len(requests)} failed: {outcome}") from outcome


def _batch_line(seconds: Mapping[int, float]) -> str:
    if not seconds:
        return "does not batch (no batch term)"
    base = seconds[1]
    return ", ".join(f"B={b} {t * 1e3:.1f} ms ({t / base:.2f}x)" for b, t in seconds.items())


def _stage_inputs(
    stage: Any, name: str, shape: RequestShape, embeds: dict[str, Any], device: str
) -> dict[str, Any]:
    """What a request brings `name` at `shape` (the denoiser: the encoder's output)."""
    if name == "encoder":
        return _encoder_inputs(stage, shape)
    if name == "denoiser":
        return embeds
    return {"latents": _latents(stage, shape, device)}


def _error(profile: Profile, m: Measurement) -> float:
    """Relative error of the fitted model at a measured shape."""
    predicted = profile.service_time(m.stage, profile.accelerators[0].name, m.shape)
    return abs(predicted - m.seconds) / m.seconds if m.seconds > 0 else 0.0


def _params(info: ModelInfo, shape: RequestShape) -> GenerationParams:
    return GenerationParams(
        prompt=PROMPT,
        width=shape.width,
        height=shape.height,
        num_inference_steps=shape.steps,
        guidance_scale=info.default_guidance,
        num_frames=shape.frames,
        fps=info.default_fps,
    )


def _encoder_inputs(stage: Any, shape: RequestShape) -> dict[str, Any]:
    """What a request brings the encoder: an image-to-video model's reference image."""
    import torch

    specs = stage.input_names(_params(stage.info, shape))
    if "reference_image" not in specs:
        return {}
    gen = torch.Generator().manual_seed(0)
    return {
        "reference_image": torch.randint(
            0, 256, (shape.height, shape.width, 3), generator=gen, dtype=torch.uint8
        )
    }


def _latents(stage: Any, shape: RequestShape, device: str) -> Any:
    import torch

    params = GenerationParams(
        prompt=PROMPT, width=shape.width, height=shape.height, num_frames=shape.frames
    )
    size = stage.latent_shape(params)
    return torch.randn(size, generator=torch.Generator().manual_seed(0)).to(device)


def _shape_dict(shape: RequestShape) -> dict[str, int]:
    return {
        "width": shape.width,
        "height": shape.height,
        "frames": shape.frames,
        "steps": shape.steps,
    }
