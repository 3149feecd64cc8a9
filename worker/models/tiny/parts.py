"""Parts the tiny builtins share: in-memory tokenizers, a small CLIP config, a small VAE.

Nothing here downloads: tokenizers are built from small vocabularies with the
`tokenizers` library, wrapped in the transformers classes the pipelines expect.
"""

from __future__ import annotations

import string
from typing import Any

SEED = 1234  # every builtin seeds its components from here, in a fixed order


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable-char table: every byte has a token."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


# A few merges so BPE actually merges; not meant to be linguistically useful.
_CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("e", "r"), ("o", "n</w>")]


def clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in _CLIP_MERGES)]:
        vocab.setdefault(token, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    merges: Any = list(_CLIP_MERGES)  # tokenizers wants (a, b) pairs; the stub says str
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    # Unigram pieces: every printable ASCII char alone and word-initial; the
    # rest maps to <unk>, which is all a random-weight encoder needs.
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(c, -5.0), ("▁" + c, -4.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=256)


def clip_config(tokenizer: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None) -> Any:
    from diffusers import AutoencoderKL

    # Four blocks -> three downsamples -> vae_scale_factor 8, as in SD/SD3.
    kwargs: dict[str, Any] = {}
    if shift_factor is not None:  # SD3 style: shifted latents, no quant convs
        kwargs = {
            "shift_factor": shift_factor,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        }
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        **kwargs,
    )
