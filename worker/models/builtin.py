"""The two builtin tiny random-weight models, built offline and cached on disk.

There is no model hub here, so the builtins are built from configs with a fixed
seed and saved as ordinary diffusers pipeline directories; every stage then
loads them through the same `from_pretrained` path a real checkpoint takes.
Only the build imports torch/diffusers, so the gateway can call
`ensure_builtin` cheaply once the cache is warm.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import string
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BUILTIN_NAMES = ("tiny-unet", "tiny-mmdit")
# Written last into every builtin dir; bump BUILD_VERSION when a config below
# changes so stale caches are rebuilt instead of silently reused.
SIDECAR = "disagfusion.json"
BUILD_VERSION = 1
SEED = 1234
# Building seeds torch's global RNG, so threads of one process build one at a time.
_BUILD_LOCK = threading.Lock()

# Serving defaults recorded in the sidecar (describe_model reads them).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny-unet": {"default_steps": 10, "default_guidance": 7.5, "max_size": 512},
    "tiny-mmdit": {"default_steps": 10, "default_guidance": 7.0, "max_size": 512},
}


def default_cache_dir() -> Path:
    """Root of the builtin cache: $DISAGFUSION_CACHE or ~/.cache/disagfusion/models."""
    env = os.environ.get("DISAGFUSION_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "disagfusion" / "models"


def builtin_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / name


def read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / SIDECAR).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_current(path: Path, name: str) -> bool:
    meta = read_sidecar(path)
    return (
        meta is not None
        and meta.get("name") == name
        and meta.get("version") == BUILD_VERSION
        and (path / "model_index.json").is_file()
    )


def ensure_builtin(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cached dir of builtin `name`, building it first if needed.

    Built in a temp dir beside the target and renamed into place: rename is
    atomic, so processes starting together never see a half-written model;
    the losers of the race drop their copy and use the winner's.
    """
    if name not in BUILTIN_NAMES:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    final = builtin_path(name, cache_dir)
    if _is_current(final, name):
        return final
    with _BUILD_LOCK:
        if not _is_current(final, name):
            _build_and_swap(name, final)
    return final


def _build_and_swap(name: str, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=final.parent))
    try:
        build_builtin(name, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        if final.exists() and not _is_current(final, name):
            # Stale build from an older BUILD_VERSION: move it aside, then swap.
            # Renaming onto a fresh empty dir works and cannot collide.
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=final.parent))
            with contextlib.suppress(OSError):  # another process moved it first
                final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            if not _is_current(final, name):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_builtin(name: str, out_dir: str | os.PathLike[str]) -> None:
    """Build builtin `name` deterministically and save it into `out_dir`."""
    import torch

    builders = {"tiny-unet": _build_tiny_unet, "tiny-mmdit": _build_tiny_mmdit}
    if name not in builders:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):  # keep the caller's RNG state untouched
        pipe = builders[name]()
    with quiet_progress():
        pipe.save_pretrained(out, safe_serialization=True)
    meta = {"builder": "disagfusion", "name": name, "version": BUILD_VERSION, **_DEFAULTS[name]}
    (out / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide diffusers/transformers tqdm bars (saving, loading) for the duration."""
    from diffusers.utils import logging as df_logging
    from transformers.utils import logging as hf_logging

    enabled = [(m, m.is_progress_bar_enabled()) for m in (df_logging, hf_logging)]
    for module, _ in enabled:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was_enabled in enabled:
            if was_enabled:
                module.enable_progress_bar()


# --- tokenizers -------------------------------------------------------------


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


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*chars, *(c + "</w>" for c in chars), *(a + b for a, b in _CLIP_MERGES)]:
        vocab.setdefault(token, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    merges: Any = list(_CLIP_MERGES)  # tokenizers wants (a, b) pairs; the stub says str
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    # Unigram pieces: every printable ASCII char alone and word-initial; the
    # rest maps to <unk>, which is all a random-weight encoder needs.
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(c, -5.0), ("▁" + c, -4.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=256)


def _clip_config(tokenizer: Any) -> Any:
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


# --- pipelines --------------------------------------------------------------


def _build_tiny_unet() -> Any:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
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
    vae = _tiny_vae(latent_channels=4, scaling_factor=0.18215)
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


def _build_tiny_mmdit() -> Any:
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer))
    torch.manual_seed(SEED + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2))
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
    vae = _tiny_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
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


def _tiny_vae(
    latent_channels: int, scaling_factor: float, shift_factor: float | None = None
) -> Any:
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
