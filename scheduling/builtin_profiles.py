"""Builtin performance profiles, calibrated from docs/calibration.md (pure data).

How the published batch-1 stage times became coefficients:
- the text encoder's time does not depend on the output shape: all of it is `a`;
- the VAE decoder scales with pixels: all of it is `b` (seconds per megapixel);
- the denoiser's time at the published shape is split between `c` (linear
  layers, ∝ P·steps) and `d` (attention, ∝ P²·steps): 50/50 for Wan's 32k-token
  video, 70/30 for Qwen-Image's 7k-token image. The split only matters for
  shapes other than the published one.
Start-up times are the pod's image pull plus weight load: assumed, not published.

Batching across requests (CALIBRATION.md, "Batching across requests, published"):
the only published per-batch times for these models are SGLang's Qwen-Image-2512
denoiser on an H200 (sglang PR 22183, 50 steps, time per step against batch 1):
  512²:  B=2 1.10x, 3 1.12x, 4 1.44x, 8 2.55x, 16 4.99x (throughput up to 3.2x)
  1024²: B=2 1.95x, 3 2.92x (1.02x throughput: compute-bound at batch 1)
A batch term is measured at the profile's default request, and the gain falls as
the request grows (a big image already fills the GPU). The Qwen profiles' default
is 1328², past 1024², so they carry the 1024² factors, an upper bound on the gain
there; on an H100 (same compute as an H200, less memory bandwidth) and an L40S
(less compute) a batch is at least as compute-bound. At 2-3 % more throughput for
up to 3x the latency those profiles keep `max_batch: 1` (serve one at a time);
`disagfusion plan --max-batch 3` shows what batching would change. Wan2.1's
stages and every encoder and decoder have no published batch numbers: batch 1.
"""

from __future__ import annotations

from typing import Any

from disagfusion.scheduling.profile import Profile, parse_profile

# How a profile, trace or model names a builtin one: "builtin:NAME".
BUILTIN_PREFIX = "builtin:"


def _denoiser(
    seconds: float, width: int, height: int, frames: int, steps: int, linear: float
) -> dict[str, float]:
    p = width * height * frames / 1e6
    return {
        "c": round(linear * seconds / (p * steps), 6),
        "d": round((1 - linear) * seconds / (p * p * steps), 8),
    }


def _scaled(cost: dict[str, Any], factor: float) -> dict[str, Any]:
    """A slower accelerator: times x factor; memory and batch factors (ratios) as they are."""
    kept = ("memory_gb", "batch", "max_batch")
    return {k: (v if k in kept else round(v * factor, 8)) for k, v in cost.items()}


_WAN_P = 832 * 480 * 81 / 1e6
_QWEN_P = 1328 * 1328 / 1e6
# sglang PR 22183, Qwen-Image-2512 on H200 at 1024², 50 steps: t(B)/t(1) per step.
_QWEN_BATCH_1024 = {"2": 1.95, "3": 2.92}
_QWEN_DENOISER = {
    **_denoiser(25.3, 1328, 1328, 1, 50, linear=0.7),
    "memory_gb": 40.9,
    "batch": _QWEN_BATCH_1024,
    "max_batch": 1,  # compute-bound at 1328²: batching buys ~2 % (see the module docstring)
}
_QWEN_ENCODER = {"a": 0.26, "memory_gb": 16.6}
_QWEN_DECODER = {"b": round(0.31 / _QWEN_P, 6), "memory_gb": 0.3}

BUILTIN_PROFILES: dict[str, dict[str, Any]] = {
    "wan2.1-14b-t2v-h100": {
        "description": "Wan2.1-14B text-to-video, 480P 81 frames, 50 steps, batch 1, on H100",
        "source": "docs/calibration.md: LightX2V disaggregation blog (encoder 0.89 s, denoiser"
        " 252.8 s, decoder 2.38 s on H100); memory: T5-XXL 9.4 GB, DiT 28.0 GB, VAE 0.2 GB",
        "accelerators": [{"name": "H100", "cost_per_hour": 2.5, "memory_gb": 80}],
        "startup_seconds": 180,
        "handoff_seconds": 0.03,
        "default_request": {"width": 832, "height": 480, "frames": 81, "steps": 50},
        "defaults": {"gpus": 96, "slo": "600s"},
        "stages": {
            "encoder": {"H100": {"a": 0.89, "memory_gb": 9.4}},
            "denoiser": {
                "H100": {**_denoiser(252.8, 832, 480, 81, 50, linear=0.5), "memory_gb": 28.0}
            },
            "decoder": {"H100": {"b": round(2.38 / _WAN_P, 6), "memory_gb": 0.2}},
        },
    },
    "qwen-image-h100": {
        "description": "Qwen-Image-2512 text-to-image, 1328x1328, 50 steps, batch 1, on H100",
        "source": "docs/calibration.md: LightX2V disaggregation blog (encoder 0.26 s, denoiser"
        " 25.3 s, decoder 0.31 s on H100); memory: Qwen2.5-VL 16.6 GB, DiT 40.9 GB, VAE 0.3 GB",
        "accelerators": [{"name": "H100", "cost_per_hour": 2.5, "memory_gb": 80}],
        "startup_seconds": 120,
        "handoff_seconds": 0.03,
        "default_request": {"width": 1328, "height": 1328, "frames": 1, "steps": 50},
        "defaults": {"gpus": 64, "slo": "60s"},
        "stages": {
            "encoder": {"H100": _QWEN_ENCODER},
            "denoiser": {"H100": _QWEN_DENOISER},
            "decoder": {"H100": _QWEN_DECODER},
        },
    },
    "qwen-image-h100-l40s": {
        "description": "Qwen-Image-2512 on a mixed pool: 32 H100 and 32 L40S (heterogeneous)",
        "source": "H100 rows as qwen-image-h100; L40S (48 GB, about 0.37x an H100's BF16"
        " throughput, ~1/3 the price) scaled from them: assumed, not published",
        "accelerators": [
            {"name": "H100", "cost_per_hour": 2.5, "memory_gb": 80, "count": 32},
            {"name": "L40S", "cost_per_hour": 0.9, "memory_gb": 48, "count": 32},
        ],
        "startup_seconds": 120,
        "handoff_seconds": 0.03,
        "default_request": {"width": 1328, "height": 1328, "frames": 1, "steps": 50},
        "defaults": {"gpus": 64, "slo": "60s"},
        "stages": {
            "encoder": {"H100": _QWEN_ENCODER, "L40S": _scaled(_QWEN_ENCODER, 2.0)},
            "denoiser": {"H100": _QWEN_DENOISER, "L40S": _scaled(_QWEN_DENOISER, 2.7)},
            "decoder": {"H100": _QWEN_DECODER, "L40S": _scaled(_QWEN_DECODER, 2.0)},
        },
    },
}


def builtin_profile(name: str) -> Profile:
    """A builtin profile by name (without BUILTIN_PREFIX); KeyError lists the names."""
    try:
        data = BUILTIN_PROFILES[name]
    except KeyError:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_PROFILES)
        raise KeyError(f"unknown profile {BUILTIN_PREFIX}{name} (known: {known})") from None
    return parse_profile({"name": name, **data})
