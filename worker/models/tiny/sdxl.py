"""builtin:tiny-sdxl: a StableDiffusionXLPipeline (two CLIPs, text_time UNet)."""

from __future__ import annotations

from typing import Any

from disagfusion.worker.models.tiny.parts import SEED, clip_config, clip_tokenizer, tiny_vae

SERVING = {"default_steps": 10, "default_guidance": 5.0, "max_size": 512}


def build() -> Any:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(clip_config(tokenizer))
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2))  # pooled: 32
    torch.manual_seed(SEED + 2)
    unet = UNet2DConditionModel(
        sample_size=8,  # latents; x8 VAE -> 64 px default
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),  # one downsample
        # SDXL's order: no attention at the highest resolution.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # both encoders' hidden states concatenated: 32 + 32
        attention_head_dim=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # 6 micro-conditioning ids (size, crop, target) x 8 + the pooled projection 32
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
    )
    torch.manual_seed(SEED + 3)
    vae = tiny_vae(latent_channels=4, scaling_factor=0.13025)
    # SDXL base's scheduler config.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
