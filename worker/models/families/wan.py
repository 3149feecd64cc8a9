"""Wan text-to-video: WanPipeline (UMT5 text encoder, a 3-D DiT, AutoencoderKLWan).

Wan2.1 has one transformer; Wan2.2 A14B has two experts, `transformer` for
the high-noise steps and `transformer_2` for the rest, switched at
`boundary_ratio` (in model_index.json). The denoiser loads both and the
pipeline's own loop switches between them; the request's guidance_scale
applies to both (guidance_scale_2 defaults to it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from disagfusion.worker.models.families.base import (
    ConfigReader,
    Family,
    Shape,
    SizeRules,
    TensorSpec,
)
from disagfusion.worker.params import GenerationParams

if TYPE_CHECKING:
    import numpy as np
    import torch

MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s default (encode_prompt's is 226)
DEFAULT_SIZE = (832, 480)  # the pipeline's default 480P, (width, height)
TEMPORAL = 4  # AutoencoderKLWan: one latent frame per 4 (plus the first)


class WanFamily(Family):
    name = "wan"
    pipeline_class = "WanPipeline"
    defaults = (50, 5.0)
    per_prompt = "num_videos_per_prompt"
    frame_step = TEMPORAL
    default_frames = 81
    default_fps = 16

    def size_rules(self, config: ConfigReader) -> SizeRules:
        spatial = int(config("vae").get("scale_factor_spatial") or 8)
        patch = config("transformer").get("patch_size", [1, 2, 2])
        return SizeRules(spatial, spatial * int(patch[-1]), DEFAULT_SIZE)

    def prepare(self, pipe: Any, role: str, sizes: SizeRules) -> None:
        if getattr(pipe, "vae", None) is None:
            # Without a VAE the pipeline guesses 8 and 4; set what the checkpoint has.
            pipe.vae_scale_factor_spatial = sizes.vae_scale_factor
            pipe.vae_scale_factor_temporal = TEMPORAL

    def encode(
        self, pipe: Any, params: GenerationParams, device: torch.device
    ) -> dict[str, torch.Tensor]:
        embeds, negative = pipe.encode_prompt(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt or None,
            do_classifier_free_guidance=self.uses_cfg(params),
            num_videos_per_prompt=params.num_images,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            device=device,
        )
        if negative is None:  # no CFG
            return {"prompt_embeds": embeds}
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    def embedding_specs(self, pipe: Any, params: GenerationParams) -> dict[str, TensorSpec]:
        width = (pipe.transformer or pipe.transformer_2).config.text_dim
        spec = TensorSpec((params.num_images, None, width))
        return {name: spec for name in self.embedding_names(params)}

    def latent_shape(self, pipe: Any, sizes: SizeRules, params: GenerationParams) -> Shape:
        scale = sizes.vae_scale_factor
        frames = (params.num_frames - 1) // TEMPORAL + 1
        return (
            params.num_images,
            pipe.vae.config.z_dim,
            frames,
            params.height // scale,
            params.width // scale,
        )

    def decode(
        self, pipe: Any, sizes: SizeRules, params: GenerationParams, latents: torch.Tensor
    ) -> np.ndarray:
        import torch

        vae = pipe.vae
        z = vae.config.z_dim
        latents = latents.to(dtype=vae.dtype)
        # The pipeline's exact order: divide by 1/std, then add the mean.
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
        latents = latents / std.to(latents.device, latents.dtype) + mean.to(
            latents.device, latents.dtype
        )
        video = vae.decode(latents, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="np")


FAMILY = WanFamily()
