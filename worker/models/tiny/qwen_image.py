"""builtin:tiny-qwen-image: a QwenImagePipeline (Qwen2.5-VL text encoder, MMDiT, 3D VAE)."""

from __future__ import annotations

from typing import Any

from disagfusion.worker.models.tiny.parts import SEED

# The pipeline hard-codes 1024 px as its default size; the tiny model serves 64.
SERVING = {"default_steps": 10, "default_guidance": 4.0, "max_size": 512, "default_size": [64, 64]}

# Qwen2's specials in their real order (151643..151656 there, 0..13 here).
_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# QwenImagePipeline.prompt_template_encode; the pipeline drops the tokens before
# "{}" by count (34, the real tokenizer's), so training on it makes each of its
# words one token and the prefix comes out at exactly 34 here too.
_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_CORPUS = [
    _TEMPLATE.format("a photo of a cat sitting on a red chair"),
    "a watercolor painting of a lighthouse at sunset, blurry, high quality",
]
# Qwen2's pre-tokenizer split, as in transformers' Qwen2Tokenizer.
_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen-Image's own latent statistics: non-trivial, so de-normalisation is exercised.
_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]  # fmt: skip
_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]  # fmt: skip


def qwen_tokenizer() -> Any:
    """Byte-level BPE trained in memory on _CORPUS; training is deterministic."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.add_special_tokens(_SPECIALS)  # kept whole, so no merges are spent on them
    trainer = trainers.BpeTrainer(
        vocab_size=1024,  # a cap well above what the corpus can merge to
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges: Any = [tuple(pair) for pair in model["merges"]]  # (a, b) pairs; the stub says str
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>")
    tokenizer.add_tokens(_SPECIALS, special_tokens=True)
    return tokenizer


def build() -> Any:
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),  # every id, vision tokens included, is below it
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,  # grouped-query attention, as in Qwen2.5-VL
            "max_position_embeddings": 2048,
            # head_dim 16: the t/h/w sections of M-RoPE sum to head_dim / 2
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        # Never run by text-to-image, but part of the checkpoint: keep it tiny.
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,  # text hidden size
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(SEED)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    torch.manual_seed(SEED + 1)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels packed 2x2 by the pipeline
        out_channels=16,  # proj_out: patch_size^2 x 16 = the packed 64 again
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # text hidden size
        guidance_embeds=False,  # Qwen-Image uses true CFG, not distilled guidance
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    torch.manual_seed(SEED + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # three downsamples: vae_scale_factor 8
        latents_mean=_LATENTS_MEAN,
        latents_std=_LATENTS_STD,
    )
    # Qwen/Qwen-Image's scheduler config (base/max shift ln 3 is Qwen-Image-Lightning's).
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipe: Any = QwenImagePipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    prefix = pipe.prompt_template_encode.split("{}")[0]
    n_prefix = len(tokenizer(prefix).input_ids)
    if n_prefix != pipe.prompt_template_encode_start_idx:  # it would drop prompt tokens
        raise RuntimeError(f"Qwen-Image template prefix is {n_prefix} tokens, not 34")
    return pipe
