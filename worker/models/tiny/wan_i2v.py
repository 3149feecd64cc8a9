"""builtin:tiny-wan-i2v: a WanImageToVideoPipeline (Wan2.1 I2V layout: UMT5 + CLIP vision)."""

from __future__ import annotations

from typing import Any

from disagfusion.worker.models.tiny.parts import SEED
from disagfusion.worker.models.tiny.wan import (
    Z_DIM,
    umt5_encoder,
    umt5_tokenizer,
    wan_scheduler,
    wan_transformer,
    wan_vae,
)

# The pipeline's own defaults are 480x832, 81 frames, guidance 5.0 (Wan2.1 I2V's too).
SERVING = {
    "default_steps": 10,
    "default_guidance": 5.0,
    "max_size": 256,
    "default_size": [64, 64],
    "default_frames": 9,
    "default_fps": 16,
}

CLIP_SIZE = 32  # the real image encoder (ViT-H/14) sees 224 px
CLIP_DIM = 32  # CLIP vision hidden size: the transformer's image_dim
# OpenAI CLIP's normalisation, as in the Wan2.1 I2V image_processor config.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_image_processor() -> Any:
    # The PIL-backed class by name: plain CLIPImageProcessor picks a torchvision
    # backend where one is installed, so the saved class would vary by host.
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": CLIP_SIZE},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
        do_convert_rgb=True,
    )


def clip_vision_encoder() -> Any:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    # (32 / 8)^2 patches + the class token: image_embeds of 17 tokens (257 for real).
    config = CLIPVisionConfig(
        hidden_size=CLIP_DIM,
        intermediate_size=64,
        num_hidden_layers=2,  # the pipeline takes hidden_states[-2]
        num_attention_heads=4,
        image_size=CLIP_SIZE,
        patch_size=8,
        projection_dim=32,
    )
    return CLIPVisionModel(config)


def build() -> Any:
    import torch
    from diffusers import WanImageToVideoPipeline

    tokenizer = umt5_tokenizer()
    image_processor = clip_image_processor()
    torch.manual_seed(SEED)
    text_encoder = umt5_encoder(tokenizer)
    torch.manual_seed(SEED + 1)
    image_encoder = clip_vision_encoder()
    torch.manual_seed(SEED + 2)
    # Noise latents + 4 mask channels (the VAE's temporal factor) + condition latents.
    transformer = wan_transformer(in_channels=2 * Z_DIM + 4, image_dim=CLIP_DIM)
    torch.manual_seed(SEED + 3)
    vae = wan_vae()
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=wan_scheduler(),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
    )
