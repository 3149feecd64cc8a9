"""Video families (Wan text-to-video and image-to-video): the split stages
equal the diffusers pipeline, frame for frame; MP4 encoding."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from disagfusion.worker.models import (
    StageInputError,
    StageModel,
    describe_model,
    ensure_builtin,
    load_stage,
)
from disagfusion.worker.models.builtin import SIDECAR
from disagfusion.worker.models.video import decode_mp4, encode_mp4
from disagfusion.worker.params import GenerationParams
from disagfusion.worker.runtime.serve import encode_videos

ROLES = ("encoder", "denoiser", "decoder", "monolithic")
REFERENCE = (np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8")


@pytest.fixture(scope="module")
def wan() -> Iterator[dict[tuple[str, str], StageModel]]:
    yield {
        (name, role): load_stage(role, f"builtin:{name}")
        for name in ("tiny-wan", "tiny-wan-i2v")
        for role in ROLES
    }


def chain(stages: dict[tuple[str, str], StageModel], name: str, params: GenerationParams):
    inputs = {"reference_image": torch.from_numpy(REFERENCE)} if name.endswith("i2v") else {}
    embeds = stages[name, "encoder"].run(params, inputs)
    latents = stages[name, "denoiser"].run(params, embeds)
    return embeds, latents, stages[name, "decoder"].run(params, latents)["images"]


def reference(path: Path, params: GenerationParams, image: bool) -> np.ndarray:
    """The pipeline class named in model_index.json, called as its docs show."""
    index = json.loads((path / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    extra = {"image": Image.fromarray(REFERENCE)} if image else {}
    frames = pipe(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt or None,
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        num_videos_per_prompt=params.num_images,
        generator=[torch.Generator().manual_seed(s) for s in params.image_seeds()],
        output_type="np",
        **extra,
    ).frames
    return (frames * 255).round().astype("uint8")


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-wan-i2v"])
@pytest.mark.parametrize(
    ("guidance", "negative", "frames", "size"),
    [(5.0, "blurry", 9, (64, 48)), (1.0, "", 5, (48, 64)), (4.0, "", 1, (64, 64))],
)
def test_split_frames_equal_the_diffusers_pipeline(
    wan, name: str, guidance: float, negative: str, frames: int, size: tuple[int, int]
) -> None:
    params = GenerationParams(
        prompt="a fox running through snow",
        negative_prompt=negative,
        width=size[0],
        height=size[1],
        num_inference_steps=3,
        guidance_scale=guidance,
        seed=21,
        num_frames=frames,
    )
    embeds, latents, video = chain(wan, name, params)
    assert ("negative_prompt_embeds" in embeds) == (guidance > 1)
    assert video.shape == (1, frames, size[1], size[0], 3) and video.dtype == torch.uint8
    assert tuple(latents["latents"].shape) == wan[name, "decoder"].latent_shape(params)
    want = reference(ensure_builtin(name), params, image=name.endswith("i2v"))
    assert np.abs(video.numpy().astype(int) - want.astype(int)).max() <= 1
    assert len(np.unique(video.numpy())) > 1


def test_two_videos_each_keep_their_seed(wan) -> None:
    batch = GenerationParams(
        "a fox", width=64, height=48, num_inference_steps=3, num_frames=5, seed=4, num_images=2
    )
    _, _, videos = chain(wan, "tiny-wan", batch)
    assert not torch.equal(videos[0], videos[1])
    alone = GenerationParams(
        "a fox", width=64, height=48, num_inference_steps=3, num_frames=5, seed=5
    )
    _, _, second = chain(wan, "tiny-wan", alone)
    assert int((videos[1].int() - second[0].int()).abs().max()) <= 1


def test_the_two_experts_of_wan22_both_run(wan) -> None:
    """boundary_ratio switches from transformer to transformer_2 in the loop."""
    denoiser = wan["tiny-wan", "denoiser"]
    assert denoiser.pipe.transformer is not None and denoiser.pipe.transformer_2 is not None
    assert denoiser.pipe.config.boundary_ratio == 0.875
    calls = {"transformer": 0, "transformer_2": 0}
    hooks = [
        getattr(denoiser.pipe, n).register_forward_hook(
            lambda *_, n=n: calls.__setitem__(n, calls[n] + 1)
        )
        for n in calls
    ]
    try:
        chain(
            wan,
            "tiny-wan",
            GenerationParams("a fox", width=64, height=48, num_inference_steps=4, num_frames=5),
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0


def test_each_video_stage_loads_only_its_components(wan) -> None:
    def present(name: str, role: str) -> set[str]:
        pipe = wan[name, role].pipe
        return {c for c in pipe.components if getattr(pipe, c) is not None}

    assert present("tiny-wan", "encoder") == {"text_encoder", "tokenizer"}
    assert present("tiny-wan", "denoiser") == {"transformer", "transformer_2", "scheduler"}
    assert present("tiny-wan", "decoder") == {"vae"}
    # Image-to-video: the image encoder runs in the encoder; the denoiser keeps
    # the small VAE for the condition latents and never loads an encoder.
    assert present("tiny-wan-i2v", "encoder") == {
        "text_encoder",
        "tokenizer",
        "image_encoder",
        "image_processor",
    }
    assert present("tiny-wan-i2v", "denoiser") == {"transformer", "scheduler", "vae"}
    assert present("tiny-wan-i2v", "decoder") == {"vae"}


def test_video_models_are_described_with_their_frame_rules() -> None:
    t2v, i2v = describe_model("builtin:tiny-wan"), describe_model("builtin:tiny-wan-i2v")
    assert (t2v.family, t2v.pipeline_class, i2v.family) == ("wan", "WanPipeline", "wan-i2v")
    assert (t2v.frame_step, t2v.default_frames, t2v.default_fps, t2v.size_multiple) == (
        4,
        9,
        16,
        16,
    )
    assert (t2v.reference, i2v.reference) == ("refused", "required")
    assert t2v.is_video and not describe_model("builtin:tiny-unet").is_video


def test_bad_video_requests_name_the_problem(wan) -> None:
    params = GenerationParams("a fox", width=64, height=48, num_inference_steps=2, num_frames=8)
    with pytest.raises(StageInputError, match=r"num_frames=8 must be 4k\+1"):
        wan["tiny-wan", "encoder"].run(params, {})
    with pytest.raises(StageInputError, match=r"missing input tensor.*reference_image"):
        wan["tiny-wan-i2v", "encoder"].run(GenerationParams("a fox", num_frames=5), {})
    with pytest.raises(StageInputError, match=r"num_frames must be 1"):
        load_stage("encoder", "builtin:tiny-unet").run(GenerationParams("a cat", num_frames=5), {})


def test_wan22_image_to_video_without_an_image_encoder(tmp_path: Path) -> None:
    """Wan2.2 I2V has no CLIP image encoder: the encoder sends no image_embeds."""
    local = tmp_path / "wan22-i2v"
    pipe = diffusers.WanImageToVideoPipeline.from_pretrained(ensure_builtin("tiny-wan-i2v"))
    config = {**pipe.transformer.config, "image_dim": None, "added_kv_proj_dim": None}
    torch.manual_seed(3)
    pipe.transformer = diffusers.WanTransformer3DModel.from_config(config)
    pipe.image_encoder = None
    pipe.image_processor = None
    pipe.save_pretrained(local)
    assert not (local / SIDECAR).exists()
    params = GenerationParams(
        "a fox", width=64, height=48, num_inference_steps=3, num_frames=5, guidance_scale=5.0
    )
    stages = {(local.name, r): load_stage(r, str(local)) for r in ROLES}
    inputs = {"reference_image": torch.from_numpy(REFERENCE)}
    embeds = stages[local.name, "encoder"].run(params, inputs)
    assert "image_embeds" not in embeds and "reference_image" in embeds
    latents = stages[local.name, "denoiser"].run(params, embeds)
    video = stages[local.name, "decoder"].run(params, latents)["images"]
    want = reference(local, params, image=True)
    assert np.abs(video.numpy().astype(int) - want.astype(int)).max() <= 1


def test_mp4_holds_every_frame_at_the_requested_rate() -> None:
    frames = (np.random.RandomState(1).rand(2, 9, 48, 64, 3) * 255).astype("uint8")
    params = GenerationParams("x", width=64, height=48, num_frames=9, fps=12, keep_frames=True)
    out = encode_videos(torch.from_numpy(frames), params)
    assert sorted(out) == ["frames.0", "frames.1", "mp4.0", "mp4.1", "thumb.0", "thumb.1"]
    decoded, rate = decode_mp4(bytes(out["mp4.0"].numpy().tobytes()))
    assert decoded.shape == (9, 48, 64, 3) and rate == 12
    assert torch.equal(out["frames.1"], torch.from_numpy(frames[1]))
    with pytest.raises(ValueError, match=r"even width and height"):
        encode_mp4(frames[0][:, :47], 16)


def test_a_plain_wan_checkpoint_gets_the_pipelines_defaults(tmp_path: Path) -> None:
    local = tmp_path / "wan"
    shutil.copytree(ensure_builtin("tiny-wan"), local)
    (local / SIDECAR).unlink()
    info = describe_model(str(local))
    assert (info.default_size, info.default_frames, info.default_steps) == ((832, 480), 81, 50)
    assert (info.default_guidance, info.default_fps) == (5.0, 16)
