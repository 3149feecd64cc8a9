"""Request parameters shared by the gateway, the stages and the baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from disagfusion.scheduling.stages import STAGES

__all__ = ["DEFAULT_MAX_IMAGES", "ROLES", "SEED_SPACE", "STAGES", "GenerationParams", "WorkerRole"]

SEED_SPACE = 2**63  # seeds are 0..2**63-1 (a signed 64-bit proto/torch field)
# A worker may also run the whole pipeline: the monolithic baseline.
WorkerRole = Literal["encoder", "denoiser", "decoder", "monolithic"]
ROLES: tuple[WorkerRole, ...] = ("encoder", "denoiser", "decoder", "monolithic")
# The largest n of one request: the gateway admits no more, and a stage sizes the
# largest payload it accepts by it.
DEFAULT_MAX_IMAGES = 4


@dataclass(frozen=True)
class GenerationParams:
    """One validated generation request (batch = num_images).

    A video has num_frames > 1 (an image is one frame); fps and keep_frames only
    matter to a video decoder: the MP4's frame rate, and whether the lossless
    frames travel beside it."""

    prompt: str
    negative_prompt: str = ""
    width: int = 64
    height: int = 64
    num_inference_steps: int = 10
    guidance_scale: float = 7.5
    seed: int = 0
    num_images: int = 1
    num_frames: int = 1
    fps: int = 16
    keep_frames: bool = False

    def image_seeds(self) -> list[int]:
        """The seed of each image: image i alone is reproduced by n=1 with seed + i
        (wrapping within the accepted 0..2**63-1)."""
        return [(self.seed + i) % SEED_SPACE for i in range(self.num_images)]
