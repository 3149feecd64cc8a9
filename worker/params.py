"""Request parameters shared by the gateway, the stages and the baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

STAGES = ("encoder", "denoiser", "decoder")
# A worker may also run the whole pipeline: the monolithic baseline.
WorkerRole = Literal["encoder", "denoiser", "decoder", "monolithic"]
ROLES: tuple[WorkerRole, ...] = ("encoder", "denoiser", "decoder", "monolithic")


@dataclass(frozen=True)
class GenerationParams:
    """One validated image-generation request (batch = num_images)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 64
    height: int = 64
    num_inference_steps: int = 10
    guidance_scale: float = 7.5
    seed: int = 0
    num_images: int = 1
