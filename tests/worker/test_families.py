"""Every model family served disaggregated equals its own diffusers pipeline.

`disagfusion serve --local` runs encoder, denoiser (two of them) and decoder
as separate processes; the official `openai` client asks for images; the
reference is the diffusers pipeline class named in model_index.json, loaded
whole in this process and called with the arguments its documentation gives
for the family. fp32 on CPU: at most 1/255 apart.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import openai
import pytest
import torch
import yaml
from PIL import Image

from disagfusion.operator.spec import FAMILIES as OPERATOR_FAMILIES
from disagfusion.operator.spec import FAMILY_ALIASES as OPERATOR_ALIASES
from disagfusion.scheduling.profile import parse_profile
from disagfusion.scheduling.stages import STAGES
from disagfusion.worker.models import BUILTIN_NAMES, describe_model, ensure_builtin
from disagfusion.worker.models.families import ALIASES, FAMILIES, by_class
from tests.worker.serve_local import ServeLocal

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# (size, n, steps, guidance, negative prompt): CFG on with n > 1 and a negative
# prompt, CFG off (guidance 1), and the model's default guidance at another size.
REQUESTS: list[dict[str, Any]] = [
    {"size": "64x64", "n": 2, "num_inference_steps": 3, "guidance_scale": 5.0, "seed": 11},
    {"size": "128x64", "num_inference_steps": 3, "guidance_scale": 1.0, "seed": 12},
    {"size": "64x128", "num_inference_steps": 4, "seed": 13},
]
NEGATIVE = "blurry, low quality"
PROMPT = "a lighthouse on a cliff at dusk"


def reference_kwargs(pipeline_class: str, guidance: float, negative: str) -> dict[str, Any]:
    """The pipeline's documented guidance and negative-prompt arguments, written
    out here rather than taken from the family modules under test."""
    if pipeline_class == "FluxPipeline":  # embedded guidance, no negative prompt
        return {"guidance_scale": guidance}
    if pipeline_class == "QwenImagePipeline":  # true CFG needs a negative prompt, "" counts
        return {"true_cfg_scale": guidance, "negative_prompt": negative if guidance > 1 else None}
    return {"guidance_scale": guidance, "negative_prompt": negative or None}


def reference_images(path: Path, body: dict[str, Any], default_guidance: float) -> np.ndarray:
    index = json.loads((path / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    width, height = (int(v) for v in body["size"].split("x"))
    n = body.get("n", 1)
    guidance = body.get("guidance_scale", default_guidance)
    images = pipe(
        prompt=PROMPT,
        **reference_kwargs(index["_class_name"], guidance, body.get("negative_prompt", "")),
        height=height,
        width=width,
        num_inference_steps=body["num_inference_steps"],
        num_images_per_prompt=n,
        generator=[torch.Generator().manual_seed(body["seed"] + i) for i in range(n)],
        output_type="np",
    ).images
    return (images * 255).round().astype("uint8")


def decode(b64: str | None) -> np.ndarray:
    assert b64
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def schnell_variant(out: Path) -> Path:
    """A FLUX.1-schnell-shaped checkpoint: no guidance embedding, another depth,
    no disagfusion sidecar (so the family's own defaults apply)."""
    pipe = diffusers.FluxPipeline.from_pretrained(ensure_builtin("tiny-flux"))
    config = {**pipe.transformer.config, "guidance_embeds": False, "num_layers": 2}
    torch.manual_seed(7)
    pipe.transformer = diffusers.FluxTransformer2DModel.from_config(config)
    pipe.save_pretrained(out)
    return out


def qwen_variant(out: Path) -> Path:
    """A Qwen-Image checkpoint with a deeper DiT and other latent statistics."""
    pipe = diffusers.QwenImagePipeline.from_pretrained(ensure_builtin("tiny-qwen-image"))
    config = {**pipe.transformer.config, "num_layers": 3}
    torch.manual_seed(8)
    pipe.transformer = diffusers.QwenImageTransformer2DModel.from_config(config)
    vae_config = dict(pipe.vae.config)
    z = vae_config["z_dim"]
    vae_config["latents_mean"] = [0.1 * (i % 5) - 0.2 for i in range(z)]
    vae_config["latents_std"] = [1.5 + 0.25 * (i % 3) for i in range(z)]
    vae = diffusers.AutoencoderKLQwenImage.from_config(vae_config)
    vae.load_state_dict(pipe.vae.state_dict())
    pipe.vae = vae
    pipe.save_pretrained(out)
    return out


SAVED = {"saved-flux-schnell": schnell_variant, "saved-qwen-image": qwen_variant}


IMAGE_BUILTINS = [name for name in BUILTIN_NAMES if "wan" not in name]  # video: test_videos


@pytest.fixture(scope="module", params=[*IMAGE_BUILTINS, *SAVED])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServeLocal, Path]]:
    name = request.param
    if name in SAVED:
        path = SAVED[name](tmp_path_factory.mktemp("checkpoints") / name)
        model = str(path)
    else:
        path, model = ensure_builtin(name), f"builtin:{name}"
    with ServeLocal(tmp_path_factory.mktemp("logs"), "--model", model, "--denoisers", "2") as s:
        s.wait_serving()
        yield s, path


def test_disaggregated_images_equal_the_diffusers_pipeline(
    served: tuple[ServeLocal, Path],
) -> None:
    server, path = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    info = describe_model(str(path))
    takes_negative = info.pipeline_class != "FluxPipeline"
    for body in REQUESTS:
        body = {**body, **({"negative_prompt": NEGATIVE} if takes_negative and "n" in body else {})}
        extra = {k: v for k, v in body.items() if k not in ("size", "n")}
        result = client.images.generate(
            prompt=PROMPT, size=body["size"], n=body.get("n", 1), extra_body=extra
        )
        got = np.stack([decode(d.b64_json) for d in result.data or []])
        want = reference_images(path, body, info.default_guidance)
        assert got.shape == want.shape, body
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, body
        assert len(np.unique(got)) > 1, "a blank image proves nothing"
    if not takes_negative:
        with pytest.raises(openai.BadRequestError) as err:
            client.images.generate(prompt=PROMPT, size="64x64", extra_body={"negative_prompt": "x"})
        assert err.value.status_code == 400
        assert "negative" in err.value.message and "FluxPipeline" in err.value.message


def test_serve_refuses_a_model_of_another_family(tmp_path: Path) -> None:
    ensure_builtin("tiny-flux")
    with ServeLocal(tmp_path, "--model", "builtin:tiny-flux", "--family", "sdxl") as s:
        assert s.proc.wait(timeout=120) == 2
        s._reader.join(5)
    assert "is a FluxPipeline (family flux), but family sdxl" in s.output()
    assert "Traceback" not in s.output()


@pytest.mark.parametrize(
    "builtin",
    ["tiny-mmdit", "tiny-flux", "tiny-sdxl", "tiny-qwen-image", "tiny-wan", "tiny-wan-i2v"],
)
def test_profile_measures_every_family(tmp_path: Path, builtin: str) -> None:
    out = tmp_path / "profile.yaml"
    argv = [sys.executable, "-m", "disagfusion", "profile", "--model", f"builtin:{builtin}"]
    subprocess.run([*argv, "--quick", "-o", str(out)], check=True, timeout=300)
    profile = parse_profile(yaml.safe_load(out.read_text()))
    (acc,) = profile.accelerators
    assert all(profile.stages[stage][acc.name].memory_gb > 0 for stage in STAGES)
    assert profile.default_request.width == 64
    # Video models are measured at their default clip length (tiny-wan: 9 frames).
    assert profile.default_request.frames == describe_model(f"builtin:{builtin}").default_frames


def test_every_family_is_a_diffusers_pipeline_the_operator_knows() -> None:
    assert ("auto", *FAMILIES) == OPERATOR_FAMILIES
    assert ALIASES == OPERATOR_ALIASES
    for family in FAMILIES.values():
        assert hasattr(diffusers, family.pipeline_class)
        assert by_class(family.pipeline_class) is family
    # One builtin per family, so every family's code runs in these tests.
    assert {describe_model(f"builtin:{n}").family for n in BUILTIN_NAMES} == set(FAMILIES)
