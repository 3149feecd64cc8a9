"""Batched pipeline calls of every family equal the unbatched ones (real diffusers
pipelines, random weights, fp32 CPU).

Batched kernels are not bit-exact, so images are compared within 1/255; each
request keeps its own seeds (different seeds still give different images) and
its own errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
import torch

from disagfusion.worker.models import BUILTIN_NAMES, StageInputError, load_stage
from disagfusion.worker.models.stages import StageModel
from disagfusion.worker.params import GenerationParams
from disagfusion.worker.progress import RequestCancelled
from disagfusion.worker.runtime.serve import StageCompute

STAGES: dict[str, dict[str, StageModel]] = {}


def stages_of(name: str) -> dict[str, StageModel]:
    if name not in STAGES:
        STAGES[name] = {
            role: load_stage(role, f"builtin:{name}") for role in ("encoder", "denoiser", "decoder")
        }
    return STAGES[name]


def requests_for(stage: StageModel) -> list[tuple[GenerationParams, dict[str, torch.Tensor]]]:
    """Three requests one call may take: other prompts, seeds and image counts."""
    width, height = stage.info.sizes.default_size
    base = GenerationParams(
        prompt="a red fox",
        width=width,
        height=height,
        num_inference_steps=3,
        guidance_scale=4.0,
        num_frames=stage.family.default_frames,
    )
    inputs = {  # image-to-video: the reference image
        name: torch.randint(0, 255, (height, width, 3), dtype=torch.uint8)
        for name in stage.family.encoder_specs(base)
    }
    # Prompts of one token length: families with unpadded embeddings batch only those.
    return [
        (replace(base, prompt="a red fox", seed=1), inputs),
        (replace(base, prompt="a grey cat", seed=2, num_images=2), inputs),
        (replace(base, prompt="a blue owl", seed=3), inputs),
    ]


def one_by_one(
    model: StageModel, requests: Sequence[tuple[GenerationParams, Mapping[str, torch.Tensor]]]
) -> list[dict[str, torch.Tensor]]:
    return [model.run(p, t) for p, t in requests]


def batched(
    model: StageModel, requests: Sequence[tuple[GenerationParams, Mapping[str, torch.Tensor]]]
) -> list[dict[str, torch.Tensor]]:
    out = model.run_batch(requests)
    for o in out:
        assert not isinstance(o, Exception), o
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_batched_calls_equal_one_by_one_within_1_255(name: str) -> None:
    s = stages_of(name)
    requests = requests_for(s["encoder"])
    emb_single = one_by_one(s["encoder"], requests)
    emb_batch = batched(s["encoder"], requests)
    for a, b in zip(emb_single, emb_batch, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-4), key
    den_requests = [(p, e) for (p, _), e in zip(requests, emb_single, strict=True)]
    keys = {s["denoiser"].batch_key(p, e) for p, e in den_requests}
    if s["denoiser"].family.batch_roles >= {"denoiser"}:
        assert len(keys) == 1 and None not in keys, "these requests should share one call"
    else:
        assert keys == {None}
    lat_single = one_by_one(s["denoiser"], den_requests)
    lat_batch = batched(s["denoiser"], den_requests)
    dec_requests = [(p, lat) for (p, _), lat in zip(requests, lat_single, strict=True)]
    dec_batched = [(p, lat) for (p, _), lat in zip(requests, lat_batch, strict=True)]
    assert len({s["decoder"].batch_key(p, t) for p, t in dec_requests}) == 1
    img_single = one_by_one(s["decoder"], dec_requests)
    img_batch = batched(s["decoder"], dec_batched)
    for (params, _), a, b in zip(requests, img_single, img_batch, strict=True):
        assert a["images"].shape == b["images"].shape
        assert a["images"].shape[0] == params.num_images
        diff = (a["images"].int() - b["images"].int()).abs().max().item()
        assert diff <= 1, f"{name}: batched image differs by {diff}/255"
    # Seeds stay per request: the batch did not give everyone the same noise.
    assert not torch.equal(img_batch[0]["images"][0], img_batch[2]["images"][0])


def test_a_bad_request_fails_alone_in_its_batch() -> None:
    s = stages_of("tiny-unet")
    requests = requests_for(s["encoder"])
    embs = one_by_one(s["encoder"], requests)
    good = [(p, e) for (p, _), e in zip(requests, embs, strict=True)]
    wrong = {"prompt_embeds": good[0][1]["prompt_embeds"][:, :5]}  # no negative, short
    out = s["denoiser"].run_batch([good[0], (good[1][0], wrong), good[2]])
    assert isinstance(out[1], StageInputError)
    assert "negative_prompt_embeds" in str(out[1])
    for i in (0, 2):
        assert isinstance(out[i], dict)
        alone = s["denoiser"].run(*good[i])
        assert torch.allclose(out[i]["latents"], alone["latents"], atol=1e-4)  # type: ignore[index]


def test_a_failing_batched_call_is_retried_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    s = stages_of("tiny-unet")
    denoiser = s["denoiser"]
    requests = requests_for(s["encoder"])
    embs = one_by_one(s["encoder"], requests)
    good = [(p, e) for (p, _), e in zip(requests, embs, strict=True)]
    real = denoiser.family.denoise
    calls: list[int] = []

    def flaky(pipe: Any, params: GenerationParams, embeds: Any, generator: Any) -> torch.Tensor:
        calls.append(params.num_images)
        if params.num_images > 1 or params.seed == 2:  # the batch, and request 2 alone
            raise RuntimeError("out of memory")
        return real(pipe, params, embeds, generator)

    monkeypatch.setattr(denoiser.family, "denoise", flaky)
    out = denoiser.run_batch(good)
    assert calls[0] == 4  # one call for all (1 + 2 + 1 images), then one per request
    assert calls[1:] == [1, 2, 1]
    assert isinstance(out[0], dict) and isinstance(out[2], dict)
    assert isinstance(out[1], RuntimeError) and "out of memory" in str(out[1])


def test_a_batch_cancelled_as_a_whole_ends_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    s = stages_of("tiny-unet")
    denoiser = s["denoiser"]
    requests = requests_for(s["encoder"])
    embs = one_by_one(s["encoder"], requests)

    def cancelled(*args: Any) -> torch.Tensor:
        raise RequestCancelled("cancelled after step 1 of 3")

    monkeypatch.setattr(denoiser.family, "denoise", cancelled)
    out = denoiser.run_batch([(p, e) for (p, _), e in zip(requests, embs, strict=True)])
    assert all(isinstance(o, RequestCancelled) for o in out)


def test_the_last_hop_encodes_each_request_s_images_after_the_split() -> None:
    s = stages_of("tiny-unet")
    requests = requests_for(s["encoder"])
    embs = one_by_one(s["encoder"], requests)
    lats = one_by_one(s["denoiser"], [(p, e) for (p, _), e in zip(requests, embs, strict=True)])
    compute = StageCompute(s["decoder"])
    out = compute.run_batch([(p, lat) for (p, _), lat in zip(requests, lats, strict=True)])
    assert [sorted(o) if isinstance(o, dict) else o for o in out] == [
        ["png.0"],
        ["png.0", "png.1"],
        ["png.0"],
    ]
    assert compute.default_max_batch() == 4


def test_video_models_do_not_batch_their_denoiser_by_default() -> None:
    s = stages_of("tiny-wan")
    assert s["denoiser"].default_max_batch() == 1
    assert s["decoder"].default_max_batch() == 1
    assert s["encoder"].default_max_batch() == 4


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-sdxl", "tiny-mmdit"])
def test_the_encoder_joins_prompts_into_one_call(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = stages_of(name)["encoder"]
    requests = requests_for(encoder)
    calls: list[Any] = []
    real = encoder.pipe.encode_prompt

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["prompt"])
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder.pipe, "encode_prompt", counting)
    out = encoder.run_batch(requests)
    assert calls == [["a red fox", "a grey cat", "a grey cat", "a blue owl"]]
    assert [o["prompt_embeds"].shape[0] for o in out] == [1, 2, 1]  # type: ignore[index]
    # A negative prompt on one request only: those cannot share a call.
    calls.clear()
    mixed = [requests[0], (replace(requests[1][0], negative_prompt="blurry"), requests[1][1])]
    encoder.run_batch(mixed)
    assert calls == ["a red fox", "a grey cat"]


def test_one_request_s_encoding_failure_fails_it_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    s = stages_of("tiny-unet")
    requests = requests_for(s["encoder"])
    embs = one_by_one(s["encoder"], requests)
    lats = one_by_one(s["denoiser"], [(p, e) for (p, _), e in zip(requests, embs, strict=True)])
    compute = StageCompute(s["decoder"])
    real = compute._finish

    def finish(params: GenerationParams, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if params.seed == 2:
            raise OSError("disk full")
        return real(params, out)

    monkeypatch.setattr(compute, "_finish", finish)
    out = compute.run_batch([(p, lat) for (p, _), lat in zip(requests, lats, strict=True)])
    assert isinstance(out[1], OSError)
    assert isinstance(out[0], dict) and isinstance(out[2], dict)


def test_image_models_batch_more_on_accelerators_by_default() -> None:
    unet = stages_of("tiny-unet")["denoiser"]
    on_gpu = StageModel("denoiser", unet.info, unet.pipe, torch.device("cuda"), torch.float32)
    assert (unet.default_max_batch(), on_gpu.default_max_batch()) == (4, 8)
    wan = stages_of("tiny-wan")["denoiser"]
    wan_gpu = StageModel("denoiser", wan.info, wan.pipe, torch.device("cuda"), torch.float32)
    assert (wan.default_max_batch(), wan_gpu.default_max_batch()) == (1, 1)
