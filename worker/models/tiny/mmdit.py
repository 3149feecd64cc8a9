"""builtin:tiny-mmdit: a StableDiffusion3Pipeline (MMDiT, CLIP x2 + T5)."""

from __future__ import annotations

from typing import Any

from disagfusion.worker.models.tiny.parts import (
    SEED,
    clip_config,
    clip_tokenizer,
    t5_tokenizer,
    tiny_vae,
)

SERVING = {"default_steps": 10, "default_guidance": 7.0, "max_size": 512}


def build() -> Any:
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModelWithProjection(clip_config(tokenizer))
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(tokenizer_2))
    torch.manual_seed(SEED + 2)
    # SD3 pads the concatenated CLIP states (32 + 32) to the T5 width: d_model 64.
    t5_config = T5Config(
        vocab_size=len(tokenizer_3),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer_3.pad_token_id,
        eos_token_id=tokenizer_3.eos_token_id,
    )
    text_encoder_3 = T5EncoderModel(t5_config)
    torch.manual_seed(SEED + 3)
    transformer = SD3Transformer2DModel(
        sample_size=8,  # latents; x8 VAE -> 64 px default
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5 d_model
        caption_projection_dim=64,
        pooled_projection_dim=64,  # two CLIP projections of 32
        pos_embed_max_size=64,  # 64 patches x2 x8 = 1024 px, above max_size 512
    )
    torch.manual_seed(SEED + 4)
    vae = tiny_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
