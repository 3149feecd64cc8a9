"""builtin:tiny-flux: a FluxPipeline (FLUX.1-dev layout: CLIP + T5, guidance-distilled DiT)."""

from __future__ import annotations

from typing import Any

from disagfusion.worker.models.tiny.parts import (
    SEED,
    clip_config,
    clip_tokenizer,
    t5_tokenizer,
    tiny_vae,
)

# The pipeline hard-codes 1024 px as its default size; the tiny model serves 64.
SERVING = {"default_steps": 10, "default_guidance": 3.5, "max_size": 512, "default_size": [64, 64]}


def build() -> Any:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(clip_config(tokenizer))  # pooled output: hidden size 32
    torch.manual_seed(SEED + 1)
    # FLUX pads T5 input to 512 tokens; relative attention has no length limit.
    t5_config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
    )
    text_encoder_2 = T5EncoderModel(t5_config)
    torch.manual_seed(SEED + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2 by the pipeline
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP hidden size
        guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    torch.manual_seed(SEED + 3)
    vae = tiny_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159)
    # FLUX.1-dev's scheduler config: the shift grows with the image's token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )
