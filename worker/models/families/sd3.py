"""Stable Diffusion 3 / 3.5: StableDiffusion3Pipeline (MMDiT; CLIP-L, CLIP-G, T5)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from disagfusion.worker.models.families.base import (
    ConfigReader,
    SizeRules,
    TensorSpec,
    sample_size,
    vae_scale,
)
from disagfusion.worker.models.families.unet import (
    POOLED_RETURNS,
    UNetFamily,
    pooled_specs,
    scaled_decode,
)
from disagfusion.worker.params import GenerationParams

if TYPE_CHECKING:
    import numpy as np
    import torch


class SD3Family(UNetFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    components = {
        "encoder": ("text_encoder", "tokenizer"),
        "denoiser": ("transformer", "scheduler"),
        "decoder": ("vae",),
    }
    defaults = (28, 7.0)
    embeddings = ("prompt_embeds", "pooled_prompt_embeds")
    encode_returns = POOLED_RETURNS

    def size_rules(self, config: ConfigReader) -> SizeRules:
        scale = vae_scale(config)
        net = config("transformer")
        width, height = sample_size(net, 128)
        return SizeRules(
            scale, scale * int(net.get("patch_size", 2)), (width * scale, height * scale)
        )

    def load_overrides(self) -> dict[str, Any]:
        return {}

    def encode_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        return {"prompt": params.prompt, "prompt_2": None, "prompt_3": None}

    def embedding_specs(self, pipe: Any, params: GenerationParams) -> dict[str, TensorSpec]:
        return transformer_specs(pipe, params, self.embedding_names(params))

    def decode(
        self, pipe: Any, sizes: SizeRules, params: GenerationParams, latents: torch.Tensor
    ) -> np.ndarray:
        return scaled_decode(pipe, latents, shift=True)


def transformer_specs(
    pipe: Any, params: GenerationParams, names: tuple[str, ...]
) -> dict[str, TensorSpec]:
    """Sequence and pooled embeddings as an MMDiT (SD3, FLUX) projects them."""
    config = pipe.transformer.config
    return dict(
        pooled_specs(params, names, config.joint_attention_dim, config.pooled_projection_dim)
    )


FAMILY = SD3Family()
