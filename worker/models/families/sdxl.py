"""SDXL: StableDiffusionXLPipeline (UNet; CLIP-L + OpenCLIP-G, pooled embeddings,
size and crop time ids). The refiner is out of scope."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from disagfusion.worker.models.families.base import ConfigReader, SizeRules, TensorSpec
from disagfusion.worker.models.families.unet import (
    POOLED_RETURNS,
    UNetFamily,
    pooled_specs,
    unet_size_rules,
)
from disagfusion.worker.params import GenerationParams

if TYPE_CHECKING:
    import numpy as np
    import torch

# SDXL's add_time_ids: original size, crop top-left and target size, two numbers each.
_TIME_IDS = 6


class SDXLFamily(UNetFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    defaults = (50, 5.0)
    embeddings = ("prompt_embeds", "pooled_prompt_embeds")
    encode_returns = POOLED_RETURNS

    def size_rules(self, config: ConfigReader) -> SizeRules:
        return unet_size_rules(config)

    def load_overrides(self) -> dict[str, Any]:
        return {}

    def encode_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        return {"prompt": params.prompt, "prompt_2": None}

    def embedding_specs(self, pipe: Any, params: GenerationParams) -> dict[str, TensorSpec]:
        # The time ids are made by the denoiser from the request's size; the
        # pooled width is what the UNet's add embedding leaves for it.
        config = pipe.unet.config
        pooled = config.projection_class_embeddings_input_dim - _TIME_IDS * (
            config.addition_time_embed_dim
        )
        return dict(
            pooled_specs(params, self.embedding_names(params), config.cross_attention_dim, pooled)
        )

    def decode(
        self, pipe: Any, sizes: SizeRules, params: GenerationParams, latents: torch.Tensor
    ) -> np.ndarray:
        import torch

        vae = pipe.vae
        # The SDXL VAE overflows in float16: the pipeline decodes in float32.
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        latents = latents.to(vae.dtype)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:
            channels = vae.config.latent_channels
            mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="np")


FAMILY = SDXLFamily()
