"""SD 1.x / 2.x: StableDiffusionPipeline (UNet, one CLIP encoder, epsilon or v-prediction)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from disagfusion.worker.models.families.base import (
    ConfigReader,
    Family,
    SizeRules,
    TensorSpec,
    encode_order,
    sample_size,
    vae_scale,
)
from disagfusion.worker.params import GenerationParams

if TYPE_CHECKING:
    import numpy as np
    import torch


def unet_size_rules(config: ConfigReader) -> SizeRules:
    scale = vae_scale(config)
    net = config("unet")
    # Each down block but the last halves the latents; whole multiples keep
    # the UNet's skip connections aligned without its resize fallback.
    multiple = scale * 2 ** max(len(net.get("down_block_types", [])) - 1, 0)
    width, height = sample_size(net, 64)
    return SizeRules(scale, multiple, (width * scale, height * scale))


def scaled_decode(pipe: Any, latents: torch.Tensor, shift: bool = False) -> np.ndarray:
    """`latents / scaling_factor (+ shift_factor)`, VAE decode, postprocess: SD and SD3."""
    vae = pipe.vae
    latents = latents / vae.config.scaling_factor
    if shift:
        latents = latents + vae.config.shift_factor
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")


class UNetFamily(Family):
    name = "unet"
    pipeline_class = "StableDiffusionPipeline"
    components = {
        "encoder": ("text_encoder", "tokenizer"),
        "denoiser": ("unet", "scheduler"),
        "decoder": ("vae",),
    }
    defaults = (50, 7.5)
    embeddings: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    # encode_prompt returns (prompt, negative); negatives are None without CFG.
    encode_returns: ClassVar[tuple[str, ...]] = ("prompt_embeds", "negative_prompt_embeds")

    def size_rules(self, config: ConfigReader) -> SizeRules:
        return unet_size_rules(config)

    def load_overrides(self) -> dict[str, Any]:
        return {"requires_safety_checker": False}  # the checker is never loaded

    def prepare(self, pipe: Any, role: str, sizes: SizeRules) -> None:
        super().prepare(pipe, role, sizes)
        if getattr(pipe, "vae", None) is None:
            from diffusers.image_processor import VaeImageProcessor

            pipe.image_processor = VaeImageProcessor(vae_scale_factor=sizes.vae_scale_factor)

    def encode_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        return {"prompt": params.prompt}

    def encode(
        self, pipe: Any, params: GenerationParams, device: torch.device
    ) -> dict[str, torch.Tensor]:
        out = encode_order(
            self.encode_returns,
            pipe.encode_prompt(
                **self.encode_kwargs(params),
                device=device,
                num_images_per_prompt=params.num_images,
                do_classifier_free_guidance=self.uses_cfg(params),
                negative_prompt=params.negative_prompt or None,
            ),
        )
        return {name: out[name] for name in self.embedding_names(params)}

    def encode_many(
        self,
        pipe: Any,
        params: list[GenerationParams],
        device: torch.device,
        inputs: list[Mapping[str, torch.Tensor]],
    ) -> list[dict[str, torch.Tensor]]:
        """One encode_prompt call for several requests: each prompt once per image
        (what num_images_per_prompt repeats), split back per request."""
        joined = _joined_prompts(self, params)
        if joined is None:
            return super().encode_many(pipe, params, device, inputs)
        kwargs, negatives = joined
        out = encode_order(
            self.encode_returns,
            pipe.encode_prompt(
                **kwargs,
                device=device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=self.uses_cfg(params[0]),
                negative_prompt=negatives,
            ),
        )
        counts = [p.num_images for p in params]
        names = self.embedding_names(params[0])
        parts = {name: out[name].split(counts) for name in names}
        # Copies: a view would carry the whole batch's storage to the next hop.
        return [{name: parts[name][i].clone() for name in names} for i in range(len(params))]

    def embedding_specs(self, pipe: Any, params: GenerationParams) -> dict[str, TensorSpec]:
        dims = {"prompt_embeds": TensorSpec((params.num_images, None, self.text_width(pipe)))}
        return {n: dims[n.removeprefix("negative_")] for n in self.embedding_names(params)}

    def text_width(self, pipe: Any) -> int:
        return int(pipe.unet.config.cross_attention_dim)

    def decode(
        self, pipe: Any, sizes: SizeRules, params: GenerationParams, latents: torch.Tensor
    ) -> np.ndarray:
        return scaled_decode(pipe, latents)


def _joined_prompts(
    family: UNetFamily, params: list[GenerationParams]
) -> tuple[dict[str, Any], list[str] | None] | None:
    """encode_prompt's prompt arguments for several requests as lists, one entry per
    image; None where one call would not give each request what it gets alone:
    guidance differs, or some have a negative prompt and others not (no negative
    prompt is not the same as an empty one: SDXL zeroes those embeddings)."""
    if len({family.uses_cfg(p) for p in params}) > 1:
        return None
    if len({bool(p.negative_prompt) for p in params}) > 1:
        return None
    each = [family.encode_kwargs(p) for p in params]
    kwargs: dict[str, Any] = {}
    for key in each[0]:
        values = [e[key] for e in each]
        if all(v is None for v in values):
            kwargs[key] = None
        elif all(isinstance(v, str) for v in values):
            kwargs[key] = [
                v for v, p in zip(values, params, strict=True) for _ in range(p.num_images)
            ]
        else:
            return None
    negatives = None
    if params[0].negative_prompt and family.uses_cfg(params[0]):
        negatives = [p.negative_prompt for p in params for _ in range(p.num_images)]
    return kwargs, negatives


# encode_prompt's results for the pooled families (SD3, SDXL); negatives None without CFG.
POOLED_RETURNS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)


def pooled_specs(
    params: GenerationParams, names: tuple[str, ...], text_width: int, pooled_width: int
) -> Mapping[str, TensorSpec]:
    """Sequence embeddings plus pooled ones (SD3, SDXL, FLUX), negatives alike."""
    n = params.num_images
    dims = {
        "prompt_embeds": TensorSpec((n, None, text_width)),
        "pooled_prompt_embeds": TensorSpec((n, pooled_width)),
    }
    return {name: dims[name.removeprefix("negative_")] for name in names}


FAMILY = UNetFamily()
