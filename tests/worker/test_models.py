"""Model layer: builtin models, describe_model, and the split stages vs. the whole pipeline."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from disagfusion.worker.models import (
    BUILTIN_NAMES,
    ModelSourceError,
    StageInputError,
    StageModel,
    describe_model,
    ensure_builtin,
    images_to_png,
    load_stage,
)
from disagfusion.worker.models.builtin import SIDECAR, build_builtin
from disagfusion.worker.params import GenerationParams

# The image models; the video ones (tiny-wan, tiny-wan-i2v) are in test_video_models.py.
BUILTINS = [f"builtin:{name}" for name in BUILTIN_NAMES if "wan" not in name]
ROLES = ("encoder", "denoiser", "decoder", "monolithic")
POOLED_CFG = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
)
# What the encoder sends under guidance > 1, per family.
EMBEDDINGS = {
    "unet": ("prompt_embeds", "negative_prompt_embeds"),
    "sd3": POOLED_CFG,
    "sdxl": POOLED_CFG,
    "flux": ("prompt_embeds", "pooled_prompt_embeds"),  # embedded guidance: one pass
    "qwen-image": (
        "prompt_embeds",
        "prompt_embeds_mask",
        "negative_prompt_embeds",
        "negative_prompt_embeds_mask",
    ),
}
# Latents the denoiser sends for a batch of 2 at (width, height), x8 VAEs.
LATENTS = {
    "unet": lambda w, h: (2, 4, h // 8, w // 8),
    "sdxl": lambda w, h: (2, 4, h // 8, w // 8),
    "sd3": lambda w, h: (2, 16, h // 8, w // 8),
    "flux": lambda w, h: (2, (h // 16) * (w // 16), 64),  # packed 2x2 patches
    "qwen-image": lambda w, h: (2, (h // 16) * (w // 16), 64),
}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private model cache, so tests never touch ~/.cache."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def stages(cache_dir: Path) -> Iterator[dict[tuple[str, str], StageModel]]:
    yield {
        (src, role): load_stage(role, src, cache_dir=cache_dir)
        for src in BUILTINS
        for role in ROLES
    }


def run_chain(stages: dict[tuple[str, str], StageModel], source: str, params: GenerationParams):
    embeds = stages[source, "encoder"].run(params, {})
    latents = stages[source, "denoiser"].run(params, embeds)
    images = stages[source, "decoder"].run(params, latents)["images"]
    return embeds, latents, images


def max_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


@pytest.mark.parametrize("source", BUILTINS)
@pytest.mark.parametrize(("width", "height"), [(64, 64), (128, 96)])
def test_chained_stages_equal_monolithic(stages, source: str, width: int, height: int) -> None:
    params = GenerationParams(
        prompt="a red fox in the snow, 35mm",
        negative_prompt="blurry",
        width=width,
        height=height,
        num_inference_steps=4,
        guidance_scale=6.0,
        seed=1234,
        num_images=2,
    )
    family = stages[source, "encoder"].family
    if not family.negative_prompt:
        params = dataclasses.replace(params, negative_prompt="")
    embeds, latents, images = run_chain(stages, source, params)
    assert set(embeds) == set(EMBEDDINGS[family.name])
    assert all(t.shape[0] == 2 for t in embeds.values())
    assert latents["latents"].shape == LATENTS[family.name](width, height)

    mono = stages[source, "monolithic"].run(params, {})["images"]
    assert images.dtype == torch.uint8 and images.shape == (2, height, width, 3)
    assert mono.shape == images.shape
    assert max_diff(images, mono) <= 1
    assert images.unique().numel() > 1  # not a blank image


@pytest.mark.parametrize("source", BUILTINS)
def test_cfg_off_sends_no_negative_embeddings(stages, source: str) -> None:
    params = GenerationParams(prompt="a cat", guidance_scale=1.0, num_inference_steps=3, seed=7)
    embeds, _, images = run_chain(stages, source, params)
    assert not any(name.startswith("negative_") for name in embeds)
    assert stages[source, "encoder"].output_names(params) == tuple(embeds)
    mono = stages[source, "monolithic"].run(params, {})["images"]
    assert max_diff(images, mono) <= 1


@pytest.mark.parametrize("source", BUILTINS)
def test_each_image_of_a_batch_is_reproduced_alone_by_its_own_seed(stages, source: str) -> None:
    batch = GenerationParams(prompt="a cat", num_inference_steps=3, seed=5, num_images=2)
    assert batch.image_seeds() == [5, 6]
    _, _, chained = run_chain(stages, source, batch)
    mono = stages[source, "monolithic"].run(batch, {})["images"]
    assert not torch.equal(mono[0], mono[1])
    for i, seed in enumerate(batch.image_seeds()):
        alone = GenerationParams(prompt="a cat", num_inference_steps=3, seed=seed)
        one = stages[source, "monolithic"].run(alone, {})["images"][0]
        # Batched and single convolutions may round differently: 1/255 at most.
        assert max_diff(mono[i], one) <= 1 and max_diff(chained[i], one) <= 1


def test_image_seeds_wrap_within_the_accepted_range() -> None:
    params = GenerationParams(prompt="a cat", seed=2**63 - 1, num_images=2)
    assert params.image_seeds() == [2**63 - 1, 0]


@pytest.mark.parametrize("source", BUILTINS)
def test_seed_changes_the_image(stages, source: str) -> None:
    base = GenerationParams(prompt="a cat", num_inference_steps=2)
    first = stages[source, "monolithic"].run(base, {})["images"]
    again = stages[source, "monolithic"].run(base, {})["images"]
    other = stages[source, "monolithic"].run(
        GenerationParams("a cat", seed=1, num_inference_steps=2), {}
    )
    assert torch.equal(first, again)
    assert not torch.equal(first, other["images"])


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_build_is_deterministic(tmp_path: Path, name: str) -> None:
    build_builtin(name, tmp_path / "a")
    build_builtin(name, tmp_path / "b")
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert any(p.suffix == ".safetensors" for p in files)
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_ensure_builtin_reuses_the_cache(cache_dir: Path) -> None:
    path = ensure_builtin("tiny-unet", cache_dir)
    stamp = (path / SIDECAR).stat().st_mtime_ns
    assert ensure_builtin("tiny-unet", cache_dir) == path
    assert (path / SIDECAR).stat().st_mtime_ns == stamp
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temp dirs left


TEXT = {
    "unet": ["text_encoder", "tokenizer"],
    "sdxl": ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"],
    "sd3": [
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
    ],
    "flux": ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"],
    "qwen-image": ["text_encoder", "tokenizer"],
}


@pytest.mark.parametrize("source", BUILTINS)
def test_each_stage_loads_only_its_components(stages, source: str) -> None:
    family = stages[source, "encoder"].family.name
    denoiser_net = "unet" if family in ("unet", "sdxl") else "transformer"
    text = TEXT[family]
    loaded = {
        "encoder": set(text),
        "denoiser": {denoiser_net, "scheduler"},
        "decoder": {"vae"},
        "monolithic": {*text, denoiser_net, "scheduler", "vae"},
    }
    for role, expected in loaded.items():
        pipe = stages[source, role].pipe
        present = {name for name in pipe.components if getattr(pipe, name) is not None}
        assert present == expected, role
    # Without a VAE the pipeline would guess 8; the stage sets the real factor.
    assert stages[source, "denoiser"].pipe.vae_scale_factor == 8


@pytest.mark.parametrize(
    ("builtin", "role", "corrupt"),
    [
        ("tiny-qwen-image", "encoder", ("transformer", "vae")),
        ("tiny-qwen-image", "decoder", ("transformer", "text_encoder")),
        ("tiny-flux", "encoder", ("transformer", "vae")),
        ("tiny-flux", "denoiser", ("text_encoder", "text_encoder_2", "vae")),
        ("tiny-sdxl", "decoder", ("unet", "text_encoder", "text_encoder_2")),
    ],
)
def test_a_stage_never_reads_the_weights_it_does_not_run(
    cache_dir: Path, tmp_path: Path, builtin: str, role: str, corrupt: tuple[str, ...]
) -> None:
    """A user's checkpoint whose other components are unreadable still loads:
    the Qwen-Image encoder pod never touches the 20 B transformer."""
    local = tmp_path / "checkpoint"
    shutil.copytree(ensure_builtin(builtin, cache_dir), local)
    (local / SIDECAR).unlink()
    for component in corrupt:
        for weights in (local / component).glob("*.safetensors"):
            weights.write_bytes(b"not safetensors")
    stage = load_stage(role, str(local))
    assert all(getattr(stage.pipe, c) is None for c in corrupt)
    with pytest.raises(Exception, match=r"(?i)safetensor|header|deserializ|error"):
        load_stage("monolithic", str(local))


def test_describe_builtins(cache_dir: Path) -> None:
    unet = describe_model("builtin:tiny-unet", cache_dir=cache_dir)
    assert (unet.name, unet.family, unet.pipeline_class) == (
        "tiny-unet",
        "unet",
        "StableDiffusionPipeline",
    )
    assert (unet.vae_scale_factor, unet.size_multiple, unet.default_size) == (8, 16, (64, 64))
    assert (unet.max_size, unet.default_steps, unet.default_guidance) == (512, 10, 7.5)
    assert unet.source == "builtin:tiny-unet"
    assert Path(unet.path) == cache_dir / "tiny-unet"

    described = {
        name: describe_model(f"builtin:{name}", cache_dir=cache_dir)
        for name in BUILTIN_NAMES
        if "wan" not in name
    }
    assert {n: (i.family, i.pipeline_class) for n, i in described.items()} == {
        "tiny-unet": ("unet", "StableDiffusionPipeline"),
        "tiny-mmdit": ("sd3", "StableDiffusion3Pipeline"),
        "tiny-flux": ("flux", "FluxPipeline"),
        "tiny-sdxl": ("sdxl", "StableDiffusionXLPipeline"),
        "tiny-qwen-image": ("qwen-image", "QwenImagePipeline"),
    }
    for info in described.values():
        assert (info.vae_scale_factor, info.default_size, info.max_size) == (8, (64, 64), 512)
    # UNets need a whole number of down blocks; packed and patched latents 2x2.
    assert {n: i.size_multiple for n, i in described.items()} == {
        "tiny-unet": 16,
        "tiny-mmdit": 16,
        "tiny-flux": 16,
        "tiny-sdxl": 16,
        "tiny-qwen-image": 16,
    }
    assert {n: i.default_guidance for n, i in described.items()} == {
        "tiny-unet": 7.5,
        "tiny-mmdit": 7.0,
        "tiny-flux": 3.5,
        "tiny-sdxl": 5.0,
        "tiny-qwen-image": 4.0,
    }


def test_describe_local_dir(cache_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "my-model"
    shutil.copytree(ensure_builtin("tiny-mmdit", cache_dir), local)
    (local / SIDECAR).unlink()  # a plain diffusers dir: the family's pipeline defaults apply
    info = describe_model(str(local))
    assert (info.name, info.family, info.path) == ("my-model", "sd3", str(local))
    assert (info.max_size, info.default_steps, info.default_guidance) == (2048, 28, 7.0)
    assert info.size_multiple == 16


@pytest.mark.parametrize(
    ("builtin", "steps", "guidance", "size"),
    [
        # The pipelines' own __call__ defaults for checkpoints without our sidecar.
        ("tiny-flux", 28, 3.5, (1024, 1024)),  # FLUX.1-dev: guidance embedding
        ("tiny-sdxl", 50, 5.0, (64, 64)),  # the UNet's sample_size x 8
        ("tiny-qwen-image", 50, 4.0, (1024, 1024)),
    ],
)
def test_a_plain_checkpoint_gets_the_pipelines_defaults(
    cache_dir: Path,
    tmp_path: Path,
    builtin: str,
    steps: int,
    guidance: float,
    size: tuple[int, int],
) -> None:
    local = tmp_path / builtin
    shutil.copytree(ensure_builtin(builtin, cache_dir), local)
    (local / SIDECAR).unlink()
    info = describe_model(str(local))
    assert (info.default_steps, info.default_guidance, info.default_size) == (steps, guidance, size)


def test_flux_schnell_defaults_to_four_steps_without_guidance(
    cache_dir: Path, tmp_path: Path
) -> None:
    local = tmp_path / "schnell"
    shutil.copytree(ensure_builtin("tiny-flux", cache_dir), local)
    (local / SIDECAR).unlink()
    config = json.loads((local / "transformer" / "config.json").read_text())
    (local / "transformer" / "config.json").write_text(
        json.dumps({**config, "guidance_embeds": False})
    )
    info = describe_model(str(local))
    assert (info.default_steps, info.default_guidance) == (4, 0.0)


def test_family_mismatch_and_unknown_family_are_named(cache_dir: Path) -> None:
    assert describe_model("builtin:tiny-mmdit", cache_dir=cache_dir, family="mmdit").family == "sd3"
    with pytest.raises(ModelSourceError, match=r"FluxPipeline \(family flux\), but family sd3"):
        describe_model("builtin:tiny-flux", cache_dir=cache_dir, family="sd3")
    with pytest.raises(ModelSourceError, match=r"unknown model family 'dalle'; known: unet, sd3"):
        describe_model("builtin:tiny-flux", cache_dir=cache_dir, family="dalle")


def test_describe_model_does_not_import_torch(cache_dir: Path) -> None:
    """The gateway describes models from JSON alone, whatever the family."""
    paths = [str(ensure_builtin(name, cache_dir)) for name in BUILTIN_NAMES]
    families = ["unet", "sd3", "flux", "sdxl", "qwen-image", "wan", "wan-i2v"]
    code = (
        "import sys\n"
        "from disagfusion.worker.models import describe_model\n"
        f"infos = [describe_model(p) for p in {paths!r}]\n"
        f"assert [i.family for i in infos] == {families!r}\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=cache_dir)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("builtin:nope", "unknown builtin model 'builtin:nope'"),
        ("/definitely/not/here", "does not exist"),
        ("./not-here-either", "does not exist"),
        ("disagfusion-tests/not-a-cached-model", "not in the local Hugging Face cache"),
    ],
)
def test_describe_model_errors(source: str, message: str) -> None:
    with pytest.raises(ModelSourceError, match=message):
        describe_model(source)


def test_describe_model_rejects_bad_dirs(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"no model_index\.json"):
        describe_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(
        ModelSourceError,
        match=r"unsupported pipeline class KandinskyPipeline .*; supported: "
        r"StableDiffusionPipeline \(unet\), .*FluxPipeline \(flux\), .*QwenImagePipeline",
    ):
        describe_model(str(tmp_path))
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}
        )
    )
    with pytest.raises(ModelSourceError, match=r"vae/config\.json"):
        describe_model(str(tmp_path))


def test_stage_input_errors(stages) -> None:
    source = "builtin:tiny-mmdit"
    params = GenerationParams(prompt="a cat", num_inference_steps=2)
    embeds = stages[source, "encoder"].run(params, {})
    denoiser = stages[source, "denoiser"]

    missing = {k: v for k, v in embeds.items() if k != "pooled_prompt_embeds"}
    with pytest.raises(StageInputError, match=r"missing input tensor.*pooled_prompt_embeds"):
        denoiser.run(params, missing)
    with pytest.raises(StageInputError, match=r"unexpected input tensor.*bogus"):
        denoiser.run(params, {**embeds, "bogus": torch.zeros(1)})
    with pytest.raises(StageInputError, match=r"input prompt_embeds has shape"):
        denoiser.run(params, {**embeds, "prompt_embeds": embeds["prompt_embeds"][..., :8]})
    short = embeds["negative_prompt_embeds"][:, :10]
    with pytest.raises(StageInputError, match=r"negative_prompt_embeds.*shape of prompt_embeds"):
        denoiser.run(params, {**embeds, "negative_prompt_embeds": short})
    with pytest.raises(StageInputError, match=r"input prompt_embeds has dtype"):
        denoiser.run(params, {**embeds, "prompt_embeds": embeds["prompt_embeds"].long()})
    with pytest.raises(StageInputError, match=r"unexpected input tensor.*latents"):
        stages[source, "encoder"].run(params, {"latents": torch.zeros(1)})
    assert stages[source, "decoder"].latent_shape(params) == (1, 16, 8, 8)

    decoder = stages[source, "decoder"]
    with pytest.raises(StageInputError, match=r"input latents has shape"):
        decoder.run(params, {"latents": torch.zeros(1, 4, 8, 8)})
    with pytest.raises(StageInputError, match=r"width=72 must be a multiple of 16"):
        decoder.run(GenerationParams(prompt="a cat", width=72), {"latents": torch.zeros(1)})
    with pytest.raises(StageInputError, match=r"height=1024 must be in 1\.\.512"):
        decoder.run(GenerationParams(prompt="a cat", height=1024), {"latents": torch.zeros(1)})


def test_images_to_png_round_trips(stages) -> None:
    params = GenerationParams(prompt="a cat", num_inference_steps=2, num_images=2)
    images = stages["builtin:tiny-unet", "monolithic"].run(params, {})["images"]
    pngs = images_to_png(images)
    assert len(pngs) == 2
    for png, expected in zip(pngs, images, strict=True):
        decoded = Image.open(io.BytesIO(png))
        assert decoded.format == "PNG" and decoded.mode == "RGB"
        assert np.array_equal(np.asarray(decoded), expected.numpy())
    with pytest.raises(ValueError, match=r"uint8"):
        images_to_png(images.float())


def test_load_stage_rejects_unknown_role(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown role 'vae'"):
        load_stage("vae", "builtin:tiny-unet", cache_dir=cache_dir)


def test_qwen_image_masks_travel_as_integers_and_must_cover_their_embeddings(stages) -> None:
    source = "builtin:tiny-qwen-image"
    params = GenerationParams(prompt="a cat", negative_prompt="a much longer negative prompt")
    embeds = stages[source, "encoder"].run(params, {})
    assert embeds["prompt_embeds_mask"].dtype == torch.long
    # Separate passes: a negative prompt of another length is fine.
    assert embeds["negative_prompt_embeds"].shape[1] != embeds["prompt_embeds"].shape[1]
    denoiser = stages[source, "denoiser"]
    with pytest.raises(StageInputError, match=r"prompt_embeds_mask has dtype .*integer or bool"):
        denoiser.run(params, {**embeds, "prompt_embeds_mask": embeds["prompt_embeds_mask"].float()})
    cut = embeds["negative_prompt_embeds_mask"][:, :-1]
    with pytest.raises(StageInputError, match=r"negative_prompt_embeds_mask has \d+ tokens"):
        denoiser.run(params, {**embeds, "negative_prompt_embeds_mask": cut})
    # The packed latents the decoder expects: 2x2 patches of a 64x64 image's 8x8 grid.
    assert stages[source, "decoder"].latent_shape(params) == (1, 16, 64)


def test_flux_takes_no_negative_prompt(stages) -> None:
    params = GenerationParams(prompt="a cat", negative_prompt="blurry")
    with pytest.raises(StageInputError, match=r"flux models take no negative_prompt"):
        stages["builtin:tiny-flux", "encoder"].run(params, {})
