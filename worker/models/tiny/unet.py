"""builtin:tiny-unet: a StableDiffusionPipeline (SD 1.x layout) of about 1 M parameters."""

from __future__ import annotations

from typing import Any

from disagfusion.worker.models.tiny.parts import SEED, clip_config, clip_tokenizer, tiny_vae

SERVING = {"default_steps": 10, "default_guidance": 7.5, "max_size": 512}


def build() -> Any:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(clip_config(tokenizer))
    torch.manual_seed(SEED + 1)
    unet = UNet2DConditionModel(
        sample_size=8,  # latents; x8 VAE -> 64 px default
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),  # one downsample
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(SEED + 2)
    vae = tiny_vae(latent_channels=4, scaling_factor=0.18215)
    # SD's own schedule; steps_offset=1/clip_sample=False avoid the pipeline's
    # deprecation warnings for old scheduler configs.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
