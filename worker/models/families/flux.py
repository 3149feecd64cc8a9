"""FLUX.1 (dev, schnell): FluxPipeline (CLIP-L pooled + T5 sequence embeddings,
packed latents, guidance embedding for dev and none for schnell).

`guidance_scale` is the embedded guidance FLUX.1-dev was distilled with, not
classifier-free guidance: the denoiser runs one pass per step and there is no
negative prompt (the pipeline's true CFG is not exposed).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from disagfusion.worker.models.families.base import (
    ConfigReader,
    Family,
    Shape,
    SizeRules,
    TensorSpec,
    vae_scale,
)
from disagfusion.worker.models.families.sd3 import transformer_specs
from disagfusion.worker.params import GenerationParams

if TYPE_CHECKING:
    import numpy as np
    import torch

MAX_SEQUENCE_LENGTH = 512  # T5 tokens: FluxPipeline.__call__'s default
DEFAULT_SAMPLE_SIZE = 128  # latents: FluxPipeline's default 1024 px


class FluxFamily(Family):
    name = "flux"
    pipeline_class = "FluxPipeline"
    defaults = (28, 3.5)  # dev; schnell: see serving_defaults
    negative_prompt = False
    embeddings = ("prompt_embeds", "pooled_prompt_embeds")

    def size_rules(self, config: ConfigReader) -> SizeRules:
        scale = vae_scale(config)
        side = DEFAULT_SAMPLE_SIZE * scale
        # Latents are packed in 2x2 patches: each side a multiple of 2 latents.
        return SizeRules(scale, scale * 2, (side, side))

    def serving_defaults(self, config: ConfigReader) -> tuple[int, float]:
        # schnell has no guidance embedding and is distilled to 4 steps.
        return self.defaults if config("transformer").get("guidance_embeds") else (4, 0.0)

    def uses_cfg(self, params: GenerationParams) -> bool:
        return False

    def encode(
        self, pipe: Any, params: GenerationParams, device: torch.device
    ) -> dict[str, torch.Tensor]:
        # text_ids are zeros of the sequence length: the denoiser remakes them.
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=params.prompt,
            prompt_2=None,
            device=device,
            num_images_per_prompt=params.num_images,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def embedding_specs(self, pipe: Any, params: GenerationParams) -> dict[str, TensorSpec]:
        return transformer_specs(pipe, params, self.embedding_names(params))

    def latent_shape(self, pipe: Any, sizes: SizeRules, params: GenerationParams) -> Shape:
        return packed_shape(params, sizes, pipe.vae.config.latent_channels)

    def decode(
        self, pipe: Any, sizes: SizeRules, params: GenerationParams, latents: torch.Tensor
    ) -> np.ndarray:
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, params.height, params.width, sizes.vae_scale_factor)
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="np")

    def prompt_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        return {"prompt": params.prompt, **self.guidance_kwargs(params)}


def packed_shape(params: GenerationParams, sizes: SizeRules, channels: int) -> Shape:
    """FLUX and Qwen-Image latents: 2x2 patches of the latent grid, flattened."""
    patch = sizes.vae_scale_factor * 2
    return (params.num_images, (params.height // patch) * (params.width // patch), channels * 4)


FAMILY = FluxFamily()
