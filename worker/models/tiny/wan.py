"""builtin:tiny-wan: a WanPipeline (Wan2.2 T2V A14B layout: UMT5, two MoE experts, 3D VAE)."""

from __future__ import annotations

from typing import Any

from disagfusion.worker.models.tiny.parts import SEED, t5_tokenizer

# The pipeline's own defaults are 480x832, 81 frames, guidance 5.0 (the Wan2.2
# model card runs 4.0 on the high-noise and 3.0 on the low-noise expert).
SERVING = {
    "default_steps": 10,
    "default_guidance": 5.0,
    "max_size": 256,
    "default_size": [64, 64],
    "default_frames": 9,
    "default_fps": 16,
}

# Wan2.1 VAE's own latent statistics: non-trivial, so de-normalisation is exercised.
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip
Z_DIM = 16
TEXT_DIM = 32  # UMT5 d_model


def umt5_tokenizer() -> Any:
    # Wan pads every prompt to max_sequence_length 512 (the real tokenizer is UMT5's).
    tokenizer = t5_tokenizer()
    tokenizer.model_max_length = 512
    return tokenizer


def umt5_encoder(tokenizer: Any) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    # Relative attention (one bias per layer, as UMT5 has) has no length limit.
    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return UMT5EncoderModel(config)


def wan_transformer(in_channels: int = Z_DIM, image_dim: int | None = None) -> Any:
    from diffusers import WanTransformer3DModel

    heads, head_dim = 2, 16
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        # Rotary split: h = w = 2 * (16 // 6) = 4, t = 16 - 8 = 8; all even.
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=Z_DIM,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        # I2V: image tokens are embedded to the inner dim, then get their own K/V.
        image_dim=image_dim,
        added_kv_proj_dim=heads * head_dim if image_dim is not None else None,
        rope_max_seq_len=1024,
    )


def wan_vae() -> Any:
    from diffusers import AutoencoderKLWan

    # Three spatial downsamples (x8), two of them temporal too (x4): 4n+1 frames.
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
        scale_factor_temporal=4,
        scale_factor_spatial=8,
    )


def wan_scheduler() -> Any:
    from diffusers import UniPCMultistepScheduler

    # The Wan-AI *-Diffusers repos' scheduler config (the rest is UniPC's defaults).
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )


def build() -> Any:
    import torch
    from diffusers import WanPipeline

    tokenizer = umt5_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = umt5_encoder(tokenizer)
    torch.manual_seed(SEED + 1)
    transformer = wan_transformer()  # high-noise expert: t >= 875
    torch.manual_seed(SEED + 2)
    transformer_2 = wan_transformer()  # low-noise expert: t < 875
    torch.manual_seed(SEED + 3)
    vae = wan_vae()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=wan_scheduler(),
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.875,  # Wan2.2 T2V A14B's expert switch, x num_train_timesteps
    )
