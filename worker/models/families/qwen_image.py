"""Qwen-Image: QwenImagePipeline (Qwen2.5-VL text encoder with its chat
template, prompt masks, true CFG, packed latents, AutoencoderKLQwenImage).

`guidance_scale` is the pipeline's `true_cfg_scale`: above 1 the denoiser
runs a second, negative pass per step (an empty negative prompt included).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from disagfusion.worker.models.families.base import (
    ConfigReader,
    Family,
    Shape,
    SizeRules,
    TensorSpec,
)
from disagfusion.worker.models.families.flux import packed_shape
from disagfusion.worker.params import GenerationParams

if TYPE_CHECKING:
    import numpy as np
    import torch

MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default (encode_prompt's is 1024)
DEFAULT_SAMPLE_SIZE = 128  # latents: the pipeline's default 1024 px


class QwenImageFamily(Family):
    name = "qwen-image"
    pipeline_class = "QwenImagePipeline"
    defaults = (50, 4.0)
    # The mask travels with the embeddings: the pipeline only runs its
    # negative pass when a negative mask comes with the negative embeddings.
    embeddings = ("prompt_embeds", "prompt_embeds_mask")

    def size_rules(self, config: ConfigReader) -> SizeRules:
        scale = 2 ** len(config("vae").get("temperal_downsample", [False] * 3))
        side = DEFAULT_SAMPLE_SIZE * scale
        return SizeRules(scale, scale * 2, (side, side))

    def guidance_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        return {"true_cfg_scale": params.guidance_scale}

    def encode(
        self, pipe: Any, params: GenerationParams, device: torch.device
    ) -> dict[str, torch.Tensor]:
        import torch

        texts = {"": params.prompt}
        if self.uses_cfg(params):
            texts["negative_"] = params.negative_prompt
        out = {}
        for prefix, text in texts.items():
            embeds, mask = pipe.encode_prompt(
                prompt=text,
                device=device,
                num_images_per_prompt=params.num_images,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
            if mask is None:  # encode_prompt drops an all-ones mask; the pipeline does again
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            out[prefix + "prompt_embeds"] = embeds
            out[prefix + "prompt_embeds_mask"] = mask
        return out

    def embedding_specs(self, pipe: Any, params: GenerationParams) -> dict[str, TensorSpec]:
        n = params.num_images
        dims = {
            "prompt_embeds": TensorSpec((n, None, pipe.transformer.config.joint_attention_dim)),
            "prompt_embeds_mask": TensorSpec((n, None), floating=False),
        }
        return {name: dims[name.removeprefix("negative_")] for name in self.embedding_names(params)}

    def check_embeddings(self, tensors: Mapping[str, torch.Tensor]) -> str | None:
        # Positive and negative prompts run as separate passes: their lengths may
        # differ, but each mask must cover its own embeddings.
        for prefix in ("", "negative_"):
            embeds, mask = (
                tensors.get(prefix + "prompt_embeds"),
                tensors.get(prefix + "prompt_embeds_mask"),
            )
            if embeds is not None and mask is not None and mask.shape[1] != embeds.shape[1]:
                return (
                    f"input {prefix}prompt_embeds_mask has {mask.shape[1]} tokens; "
                    f"{prefix}prompt_embeds has {embeds.shape[1]}"
                )
        return None

    def latent_shape(self, pipe: Any, sizes: SizeRules, params: GenerationParams) -> Shape:
        return packed_shape(params, sizes, pipe.vae.config.z_dim)

    def decode(
        self, pipe: Any, sizes: SizeRules, params: GenerationParams, latents: torch.Tensor
    ) -> np.ndarray:
        import torch

        vae = pipe.vae
        z = vae.config.z_dim
        latents = pipe._unpack_latents(latents, params.height, params.width, sizes.vae_scale_factor)
        latents = latents.to(vae.dtype)
        # The pipeline's exact order: divide by 1/std, then add the mean.
        mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
        latents = latents / std.to(latents.device, latents.dtype) + mean.to(
            latents.device, latents.dtype
        )
        image = vae.decode(latents, return_dict=False)[0][:, :, 0]  # one frame
        return pipe.image_processor.postprocess(image, output_type="np")

    def prompt_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        negative = params.negative_prompt if self.uses_cfg(params) else None
        return {
            "prompt": params.prompt,
            "negative_prompt": negative,
            **self.guidance_kwargs(params),
        }


FAMILY = QwenImageFamily()
