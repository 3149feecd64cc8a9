"""The pure Videos API validation: worker/gateway/video_api.py."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image

from disagfusion.worker.gateway.api import MAX_SEED, ApiError
from disagfusion.worker.gateway.jobs import Job
from disagfusion.worker.gateway.video_api import (
    VideoLimits,
    VideoRequest,
    check_reference_image,
    parse_video_request,
    video_object,
)
from disagfusion.worker.models.families.base import MAX_REFERENCE_SIDE

LIMITS = VideoLimits(
    served_model="wan-tiny",
    model_aliases=("builtin:wan-tiny",),
    default_size=(64, 48),
    size_multiple=16,
    max_size=256,
    default_steps=10,
    default_guidance=5.0,
    default_frames=17,
    max_frames=81,
    default_fps=16,
)


def parse(
    fields: dict[str, str], has_reference: bool = False, limits: VideoLimits = LIMITS
) -> VideoRequest:
    return parse_video_request(fields, has_reference, limits, default_seed=lambda: 1234)


def with_field(name: str, value: str) -> dict[str, str]:
    return {"prompt": "a cat surfing", name: value}


# ----------------------------------------------------------------------------- limits


def test_limits_defaults() -> None:
    assert LIMITS.min_size == 16
    assert (LIMITS.frame_step, LIMITS.max_fps, LIMITS.max_steps) == (4, 60, 200)
    assert (LIMITS.reference, LIMITS.max_prompt_chars, LIMITS.max_guidance) == (
        "optional",
        4000,
        50.0,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"served_model": ""},
        {"size_multiple": 0},
        {"max_size": 250},
        {"default_size": (64, 40)},
        {"size_multiple": 1, "default_size": (63, 48)},  # odd: not yuv420p
        {"default_steps": 0},
        {"default_guidance": 60.0},
        {"frame_step": 0},
        {"max_frames": 80},
        {"default_frames": 18},
        {"default_frames": 85},
        {"default_fps": 0},
        {"default_fps": 61},
        {"reference": "sometimes"},
        {"max_prompt_chars": 0},
    ],
)
def test_limits_reject_inconsistent_config(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="invalid VideoLimits"):
        replace(LIMITS, **overrides)


# ---------------------------------------------------------------------------- success


def test_minimal_request_fills_defaults() -> None:
    assert parse({"prompt": "a cat surfing"}) == VideoRequest(
        prompt="a cat surfing",
        model="wan-tiny",
        width=64,
        height=48,
        num_frames=17,
        fps=16,
        num_inference_steps=10,
        guidance_scale=5.0,
        seed=1234,
        seconds="1",  # round(17 / 16)
        negative_prompt="",
        keep_frames=False,
    )


def test_full_request_with_every_extension() -> None:
    request = parse(
        {
            "prompt": "a cat surfing",
            "model": "builtin:wan-tiny",
            "seconds": "4",
            "size": "256x128",
            "num_frames": "33",
            "fps": "8",
            "num_inference_steps": "30",
            "guidance_scale": "6.5",
            "negative_prompt": "blurry",
            "seed": "42",
            "keep_frames": "true",
        }
    )
    assert request == VideoRequest(
        prompt="a cat surfing",
        model="wan-tiny",  # the served name, whichever alias was asked for
        width=256,
        height=128,
        num_frames=33,  # explicit num_frames wins over seconds
        fps=8,
        num_inference_steps=30,
        guidance_scale=6.5,
        seed=42,
        seconds="4",  # the value given is reported back
        negative_prompt="blurry",
        keep_frames=True,
    )
    assert request.size == "256x128"


@pytest.mark.parametrize(
    ("seconds", "fps", "frames"),
    [
        ("4", "16", 65),  # 4*16+1
        ("5", "16", 81),  # Wan's native clip
        ("1", "16", 17),
        ("2", "30", 61),  # 60+1
        ("1", "3", 1),  # the largest 4k+1 <= 4
        ("1", "7", 5),  # <= 8
        ("3", "27", 81),  # 81 <= 82
    ],
)
def test_seconds_give_the_largest_4k_plus_1_frames(seconds: str, fps: str, frames: int) -> None:
    request = parse({"prompt": "x", "seconds": seconds, "fps": fps})
    assert (request.num_frames, request.seconds) == (frames, seconds)


@pytest.mark.parametrize(
    ("fields", "attr", "expected"),
    [
        ({"num_frames": "1"}, "num_frames", 1),
        ({"num_frames": "81"}, "num_frames", 81),
        ({"num_frames": "65", "fps": "16"}, "seconds", "4"),
        ({"num_frames": "81", "fps": "16"}, "seconds", "5"),
        ({"size": "16x256"}, "width", 16),
        ({"size": " 128X64 "}, "height", 64),
        ({"fps": "60", "num_frames": "5"}, "fps", 60),
        ({"seed": "0"}, "seed", 0),
        ({"seed": str(MAX_SEED)}, "seed", MAX_SEED),
        ({"guidance_scale": "0"}, "guidance_scale", 0.0),
        ({"guidance_scale": "50"}, "guidance_scale", 50.0),
        ({"guidance_scale": ".5"}, "guidance_scale", 0.5),
        ({"num_inference_steps": "200"}, "num_inference_steps", 200),
        ({"keep_frames": "false"}, "keep_frames", False),
        ({"keep_frames": "1"}, "keep_frames", True),
        ({"keep_frames": "True"}, "keep_frames", True),
        ({"negative_prompt": ""}, "negative_prompt", ""),
        ({"model": "wan-tiny"}, "model", "wan-tiny"),
        ({"prompt": "猫 🐈"}, "prompt", "猫 🐈"),
    ],
)
def test_valid_fields(fields: dict[str, str], attr: str, expected: object) -> None:
    assert getattr(parse({"prompt": "a cat", **fields}), attr) == expected


def test_seed_is_random_by_default() -> None:
    seeds = {parse_video_request({"prompt": "x"}, False, LIMITS).seed for _ in range(20)}
    assert len(seeds) > 1


def test_reference_policies() -> None:
    i2v, t2v = replace(LIMITS, reference="required"), replace(LIMITS, reference="refused")
    assert parse({"prompt": "x"}, has_reference=True, limits=i2v).prompt == "x"
    assert parse({"prompt": "x"}, has_reference=False, limits=t2v).prompt == "x"
    assert parse({"prompt": "x"}, has_reference=True).prompt == "x"
    assert parse({"prompt": "x"}, has_reference=False).prompt == "x"


# ----------------------------------------------------------------------------- errors

INVALID = [
    # (fields, status, code, param)
    ({}, 400, "missing_field", "prompt"),
    ({"prompt": ""}, 400, "invalid_value", "prompt"),
    ({"prompt": " \n"}, 400, "invalid_value", "prompt"),
    ({"prompt": "x" * 4001}, 400, "out_of_range", "prompt"),
    ({"prompt": "bad \ud800"}, 400, "invalid_value", "prompt"),
    (with_field("model", "sora-2"), 404, "model_not_found", "model"),
    (with_field("model", ""), 404, "model_not_found", "model"),
    (with_field("size", "720x1280"), 400, "invalid_size", "size"),  # over max_size
    (with_field("size", "72x64"), 400, "invalid_size", "size"),  # not a multiple of 16
    (with_field("size", "0x64"), 400, "invalid_size", "size"),
    (with_field("size", "64"), 400, "invalid_size", "size"),
    (with_field("size", "64x64x64"), 400, "invalid_size", "size"),
    (with_field("size", "auto"), 400, "invalid_size", "size"),
    (with_field("size", "1" * 50 + "x64"), 400, "invalid_size", "size"),
    (with_field("seconds", "0"), 400, "out_of_range", "seconds"),
    (with_field("seconds", "-4"), 400, "out_of_range", "seconds"),
    (with_field("seconds", "4.5"), 400, "invalid_type", "seconds"),
    (with_field("seconds", "four"), 400, "invalid_type", "seconds"),
    (with_field("seconds", "12"), 400, "out_of_range", "seconds"),  # 193 frames > 81
    (with_field("num_frames", "0"), 400, "out_of_range", "num_frames"),
    (with_field("num_frames", "82"), 400, "out_of_range", "num_frames"),
    (with_field("num_frames", "85"), 400, "out_of_range", "num_frames"),
    (with_field("num_frames", "16"), 400, "invalid_value", "num_frames"),  # not 4k+1
    (with_field("num_frames", "80"), 400, "invalid_value", "num_frames"),
    (with_field("num_frames", "1.0"), 400, "invalid_type", "num_frames"),
    (with_field("num_frames", ""), 400, "invalid_type", "num_frames"),
    (with_field("fps", "0"), 400, "out_of_range", "fps"),
    (with_field("fps", "61"), 400, "out_of_range", "fps"),
    (with_field("fps", "24.0"), 400, "invalid_type", "fps"),
    (with_field("num_inference_steps", "0"), 400, "out_of_range", "num_inference_steps"),
    (with_field("num_inference_steps", "201"), 400, "out_of_range", "num_inference_steps"),
    (with_field("num_inference_steps", "ten"), 400, "invalid_type", "num_inference_steps"),
    (with_field("guidance_scale", "-0.5"), 400, "out_of_range", "guidance_scale"),
    (with_field("guidance_scale", "50.5"), 400, "out_of_range", "guidance_scale"),
    (with_field("guidance_scale", "nan"), 400, "invalid_type", "guidance_scale"),
    (with_field("guidance_scale", "inf"), 400, "invalid_type", "guidance_scale"),
    (with_field("guidance_scale", "1e999"), 400, "out_of_range", "guidance_scale"),
    (with_field("guidance_scale", "1_0"), 400, "invalid_type", "guidance_scale"),
    (with_field("seed", "-1"), 400, "out_of_range", "seed"),
    (with_field("seed", str(2**63)), 400, "out_of_range", "seed"),
    (with_field("seed", "0x10"), 400, "invalid_type", "seed"),
    (with_field("negative_prompt", "x" * 4001), 400, "out_of_range", "negative_prompt"),
    (with_field("keep_frames", "yes"), 400, "invalid_type", "keep_frames"),
    (with_field("input_reference", "http://x/y.png"), 400, "invalid_type", "input_reference"),
    (with_field("n", "2"), 400, "unknown_field", "n"),
    (with_field("Prompt", "x"), 400, "unknown_field", "Prompt"),
]


@pytest.mark.parametrize(("fields", "status", "code", "param"), INVALID)
def test_invalid(fields: dict[str, str], status: int, code: str, param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse(fields)
    err = info.value
    assert (err.status, err.code, err.param) == (status, code, param)
    assert param in err.message or param == "Prompt"
    assert len(err.message) < 1000
    assert err.body()["error"]["param"] == param
    json.dumps(err.body())


def test_num_frames_error_names_the_rule() -> None:
    with pytest.raises(ApiError, match=r"not 4k\+1 between 1 and 81"):
        parse(with_field("num_frames", "16"))


def test_size_error_names_the_rule() -> None:
    with pytest.raises(ApiError, match="multiple of 16 between 16 and 256"):
        parse(with_field("size", "72x64"))


def test_odd_sizes_are_refused_for_yuv420p() -> None:
    limits = replace(LIMITS, size_multiple=1, min_size=1, default_size=(64, 48))
    assert parse(with_field("size", "30x20"), limits=limits).width == 30
    with pytest.raises(ApiError, match="and even") as info:
        parse(with_field("size", "31x20"), limits=limits)
    assert info.value.param == "size"


def test_too_many_seconds_names_the_longest_allowed() -> None:
    with pytest.raises(ApiError, match="at most 5 at 16 fps"):
        parse(with_field("seconds", "8"))


def test_unknown_field_is_reported_first() -> None:
    with pytest.raises(ApiError) as info:
        parse({"prompt": "x", "size": "bad", "foo": "1"})
    assert (info.value.code, info.value.param) == ("unknown_field", "foo")


def test_an_image_to_video_model_requires_a_reference() -> None:
    with pytest.raises(ApiError) as info:
        parse({"prompt": "x"}, limits=replace(LIMITS, reference="required"))
    assert (info.value.status, info.value.code, info.value.param) == (
        400,
        "missing_field",
        "input_reference",
    )
    assert "image-to-video" in info.value.message


def test_a_text_to_video_model_refuses_a_reference() -> None:
    with pytest.raises(ApiError) as info:
        parse({"prompt": "x"}, has_reference=True, limits=replace(LIMITS, reference="refused"))
    assert (info.value.code, info.value.param) == ("unsupported_value", "input_reference")
    assert "text-to-video" in info.value.message


def test_unknown_model_names_what_is_served() -> None:
    with pytest.raises(ApiError) as info:
        parse(with_field("model", "sora-2"))
    assert "'sora-2'" in info.value.message and "'wan-tiny'" in info.value.message


# -------------------------------------------------------------------- reference images


def _encoded(fmt: str, size: tuple[int, int] = (8, 6)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_reference_images_accepted(fmt: str) -> None:
    check_reference_image(_encoded(fmt))
    check_reference_image(_encoded(fmt, (MAX_REFERENCE_SIDE, 2)))


@pytest.mark.parametrize(
    "data",
    [b"", b"GIF89a...", b"hello", b"RIFF\x00\x00\x00\x00WAVE", b"\x89PNG\r\n\x1a\n...."],
)
def test_reference_images_refused(data: bytes) -> None:
    with pytest.raises(ApiError) as info:
        check_reference_image(data)
    assert (info.value.status, info.value.param) == (400, "input_reference")


def test_a_reference_image_over_the_stages_bound_is_refused_from_its_header() -> None:
    with pytest.raises(ApiError) as info:
        check_reference_image(_encoded("PNG", (2, MAX_REFERENCE_SIDE + 1)))
    assert (info.value.status, info.value.param) == (400, "input_reference")
    assert f"the image is 2x{MAX_REFERENCE_SIDE + 1}" in info.value.message


# ------------------------------------------------------------------------ video object


def test_video_object_shapes_each_state() -> None:
    request = parse({"prompt": "a cat", "seconds": "4", "size": "128x64"})
    job = Job(id="video_abc", owner="", request=request, created_at=100.7)
    queued = video_object(job)
    assert queued == {
        "id": "video_abc",
        "object": "video",
        "created_at": 100,
        "completed_at": None,
        "expires_at": None,
        "model": "wan-tiny",
        "progress": 0,
        "prompt": "a cat",
        "seconds": "4",
        "size": "128x64",
        "status": "queued",
        "error": None,
        "remixed_from_video_id": None,
    }
    job.status, job.progress = "in_progress", 42
    assert video_object(job)["progress"] == 42
    job.status, job.completed_at, job.expires_at = "completed", 200.2, 300.9
    done = video_object(job)
    assert (done["progress"], done["completed_at"], done["expires_at"]) == (100, 200, 300)
    job.status, job.error_code, job.error_message = "failed", "generation_failed", "boom"
    assert video_object(job)["error"] == {"code": "generation_failed", "message": "boom"}
    json.dumps(video_object(job))
