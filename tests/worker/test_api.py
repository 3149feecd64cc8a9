"""Tests for the pure OpenAI Images API validation in disagfusion.worker.api."""

from __future__ import annotations

import argparse
import base64
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disagfusion.worker.gateway.api import (
    MAX_SEED,
    ApiError,
    RequestLimits,
    images_response,
    parse_images_request,
    parse_size,
    random_seed,
)
from disagfusion.worker.params import GenerationParams

LIMITS = RequestLimits(
    served_model="sd-tiny",
    default_size=(64, 64),
    size_multiple=8,
    max_size=256,
    default_steps=10,
    default_guidance=7.5,
)


def parse(body: object, limits: RequestLimits = LIMITS) -> GenerationParams:
    return parse_images_request(body, limits, default_seed=lambda: 1234)


def with_field(name: str, value: object) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a cat"}
    body[name] = value
    return body


# ----------------------------------------------------------------------------- limits


def test_limits_defaults() -> None:
    assert LIMITS.min_size == 8
    assert LIMITS.max_steps == 200
    assert LIMITS.max_guidance == 50.0
    assert LIMITS.max_n == 4
    assert LIMITS.max_prompt_chars == 4000
    assert "multiple of 8" in LIMITS.size_rule()


@pytest.mark.parametrize(
    "overrides",
    [
        {"size_multiple": 0},
        {"min_size": 12},
        {"max_size": 250},
        {"min_size": 512},
        {"default_size": (72, 300)},
        {"default_steps": 0},
        {"default_steps": 300},
        {"default_guidance": -1.0},
        {"max_guidance": math.inf},
        {"max_n": 0},
        {"max_prompt_chars": 0},
        {"served_model": ""},
    ],
)
def test_limits_reject_inconsistent_config(overrides: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = {
        "served_model": "m",
        "default_size": (64, 64),
        "size_multiple": 8,
        "max_size": 256,
        "default_steps": 10,
        "default_guidance": 7.5,
        **overrides,
    }
    with pytest.raises(ValueError, match="invalid RequestLimits"):
        RequestLimits(**kwargs)


# ---------------------------------------------------------------------------- success


def test_minimal_request_fills_defaults_from_limits() -> None:
    assert parse({"prompt": "a cat"}) == GenerationParams(
        prompt="a cat",
        negative_prompt="",
        width=64,
        height=64,
        num_inference_steps=10,
        guidance_scale=7.5,
        seed=1234,
        num_images=1,
    )


def test_nulls_mean_defaults() -> None:
    optional = [
        "model", "n", "size", "response_format", "seed", "num_inference_steps",
        "guidance_scale", "negative_prompt", "user", "quality", "style", "output_format",
        "background", "moderation", "output_compression", "partial_images", "stream",
    ]  # fmt: skip
    body: dict[str, Any] = {"prompt": "a cat", **dict.fromkeys(optional)}
    assert parse(body) == parse({"prompt": "a cat"})


def test_full_request() -> None:
    body = {
        "prompt": "a cat",
        "model": "sd-tiny",
        "n": 3,
        "size": "128x72",
        "response_format": "b64_json",
        "seed": 42,
        "num_inference_steps": 25,
        "guidance_scale": 3,
        "negative_prompt": "blurry",
        "user": "u-1",
        "quality": "hd",
        "style": "vivid",
        "output_format": "png",
        "background": "opaque",
        "moderation": "low",
        "output_compression": 100,
        "partial_images": 0,
        "stream": False,
    }
    params = parse(body)
    assert params == GenerationParams(
        prompt="a cat",
        negative_prompt="blurry",
        width=128,
        height=72,
        num_inference_steps=25,
        guidance_scale=3.0,
        seed=42,
        num_images=3,
    )
    assert type(params.guidance_scale) is float


def test_default_seed_is_random_by_default() -> None:
    seeds = {parse_images_request({"prompt": "x"}, LIMITS).seed for _ in range(20)}
    assert len(seeds) > 1
    assert all(0 <= s < 2**31 for s in seeds)
    assert 0 <= random_seed() < 2**31


def test_default_seed_not_called_when_seed_given() -> None:
    def boom() -> int:
        raise AssertionError("default_seed called")

    assert parse_images_request({"prompt": "x", "seed": 7}, LIMITS, default_seed=boom).seed == 7


VALID_CASES = [
    # (field, value, attribute, expected)
    ("prompt", "  padded  ", "prompt", "  padded  "),
    ("prompt", "x" * 4000, "prompt", "x" * 4000),
    ("prompt", "猫 🐈", "prompt", "猫 🐈"),
    ("n", 1, "num_images", 1),
    ("n", 4, "num_images", 4),
    # JSON (and JSON Schema) make no difference between 2.0 and 2
    ("n", 2.0, "num_images", 2),
    ("seed", 1.0, "seed", 1),
    ("num_inference_steps", 20.0, "num_inference_steps", 20),
    ("size", "8x256", "width", 8),
    ("size", "256x8", "height", 8),
    ("size", "auto", "width", 64),
    ("size", " 128X128 ", "width", 128),
    ("size", "0128x64", "width", 128),
    ("seed", 0, "seed", 0),
    ("seed", MAX_SEED, "seed", MAX_SEED),
    ("num_inference_steps", 1, "num_inference_steps", 1),
    ("num_inference_steps", 200, "num_inference_steps", 200),
    ("guidance_scale", 0, "guidance_scale", 0.0),
    ("guidance_scale", 0.0, "guidance_scale", 0.0),
    ("guidance_scale", 50, "guidance_scale", 50.0),
    ("guidance_scale", 12.25, "guidance_scale", 12.25),
    ("negative_prompt", "", "negative_prompt", ""),
    ("negative_prompt", "ugly", "negative_prompt", "ugly"),
    ("model", "sd-tiny", "prompt", "a cat"),
    ("response_format", "b64_json", "prompt", "a cat"),
]


@pytest.mark.parametrize(("field", "value", "attr", "expected"), VALID_CASES)
def test_valid_field(field: str, value: object, attr: str, expected: object) -> None:
    assert getattr(parse(with_field(field, value)), attr) == expected


IGNORED_VALID = [
    ("user", "anyone"),
    ("user", ""),
    *[("quality", q) for q in ("auto", "standard", "hd", "low", "medium", "high")],
    ("style", "vivid"),
    ("style", "natural"),
    ("output_format", "png"),
    ("background", "auto"),
    ("background", "opaque"),
    ("moderation", "auto"),
    ("moderation", "low"),
    ("output_compression", 0),
    ("output_compression", 100),
    ("partial_images", 0),
    ("partial_images", 3),
    ("stream", False),
]


@pytest.mark.parametrize(("field", "value"), IGNORED_VALID)
def test_ignored_fields_accepted(field: str, value: object) -> None:
    assert parse(with_field(field, value)) == parse({"prompt": "a cat"})


# ----------------------------------------------------------------------------- errors

INVALID_CASES = [
    # (field, value, status, code)
    ("prompt", None, 400, "missing_field"),
    ("prompt", "", 400, "invalid_value"),
    ("prompt", " \n\t", 400, "invalid_value"),
    ("prompt", "x" * 4001, 400, "out_of_range"),
    ("prompt", 5, 400, "invalid_type"),
    ("prompt", ["a", "cat"], 400, "invalid_type"),
    ("prompt", "bad \ud800 surrogate", 400, "invalid_value"),
    ("n", 0, 400, "out_of_range"),
    ("n", 5, 400, "out_of_range"),
    ("n", -1, 400, "out_of_range"),
    ("n", 10**400, 400, "out_of_range"),
    ("n", 1.5, 400, "invalid_type"),
    ("n", 2.5, 400, "invalid_type"),
    ("n", 4.0000001, 400, "invalid_type"),
    ("n", 5.0, 400, "out_of_range"),
    ("n", True, 400, "invalid_type"),
    ("n", "2", 400, "invalid_type"),
    ("size", "64", 400, "invalid_size"),
    ("size", "64x", 400, "invalid_size"),
    ("size", "64*64", 400, "invalid_size"),
    ("size", "-64x64", 400, "invalid_size"),
    ("size", "64x64x64", 400, "invalid_size"),
    ("size", "\uff16\uff14x64", 400, "invalid_size"),
    ("size", "1" * 5000 + "x64", 400, "invalid_size"),
    ("size", "0x64", 400, "invalid_size"),
    ("size", "60x64", 400, "invalid_size"),
    ("size", "264x64", 400, "invalid_size"),
    ("size", "64x1024", 400, "invalid_size"),
    ("size", "AUTO", 400, "invalid_size"),
    ("size", "", 400, "invalid_size"),
    ("size", 64, 400, "invalid_type"),
    ("size", [64, 64], 400, "invalid_type"),
    ("response_format", "url", 400, "unsupported_value"),
    ("response_format", "png", 400, "invalid_value"),
    ("response_format", 1, 400, "invalid_type"),
    ("model", "dall-e-3", 404, "model_not_found"),
    ("model", "", 404, "model_not_found"),
    ("model", "SD-TINY", 404, "model_not_found"),
    ("model", 3, 400, "invalid_type"),
    ("seed", -1, 400, "out_of_range"),
    ("seed", 2**63, 400, "out_of_range"),
    ("seed", 1.5, 400, "invalid_type"),
    ("seed", float(2**63), 400, "out_of_range"),
    ("seed", "42", 400, "invalid_type"),
    ("seed", False, 400, "invalid_type"),
    ("num_inference_steps", 0, 400, "out_of_range"),
    ("num_inference_steps", 201, 400, "out_of_range"),
    ("num_inference_steps", 20.5, 400, "invalid_type"),
    ("num_inference_steps", None, None, None),  # null is the default: no error
    ("guidance_scale", -0.1, 400, "out_of_range"),
    ("guidance_scale", 50.5, 400, "out_of_range"),
    ("guidance_scale", math.nan, 400, "out_of_range"),
    ("guidance_scale", math.inf, 400, "out_of_range"),
    ("guidance_scale", 10**400, 400, "out_of_range"),
    ("guidance_scale", "7.5", 400, "invalid_type"),
    ("guidance_scale", True, 400, "invalid_type"),
    ("negative_prompt", 0, 400, "invalid_type"),
    ("negative_prompt", "x" * 4001, 400, "out_of_range"),
    ("user", 12, 400, "invalid_type"),
    ("quality", "ultra", 400, "invalid_value"),
    ("quality", 1, 400, "invalid_type"),
    ("style", "anime", 400, "invalid_value"),
    ("output_format", "jpeg", 400, "unsupported_value"),
    ("output_format", "webp", 400, "unsupported_value"),
    ("output_format", "gif", 400, "invalid_value"),
    ("background", "transparent", 400, "unsupported_value"),
    ("background", "green", 400, "invalid_value"),
    ("moderation", "none", 400, "invalid_value"),
    ("output_compression", 101, 400, "out_of_range"),
    ("output_compression", 50.5, 400, "invalid_type"),
    ("partial_images", 4, 400, "out_of_range"),
    ("partial_images", "1", 400, "invalid_type"),
    ("stream", True, 400, "unsupported_value"),
    ("stream", "false", 400, "invalid_type"),
    ("stream", 0, 400, "invalid_type"),
]


@pytest.mark.parametrize(("field", "value", "status", "code"), INVALID_CASES)
def test_invalid_field(field: str, value: object, status: int | None, code: str | None) -> None:
    body = with_field(field, value)
    if status is None:
        parse(body)
        return
    with pytest.raises(ApiError) as info:
        parse(body)
    err = info.value
    assert (err.status, err.code, err.param) == (status, code, field)
    assert field in err.message
    assert len(err.message) < 1000  # huge inputs are not echoed back
    assert err.body() == {
        "error": {
            "message": err.message,
            "type": "invalid_request_error",
            "param": field,
            "code": code,
        }
    }
    json.dumps(err.body())  # serialisable


def test_missing_prompt() -> None:
    with pytest.raises(ApiError) as info:
        parse({"n": 1})
    assert (info.value.status, info.value.code, info.value.param) == (
        400,
        "missing_field",
        "prompt",
    )


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("64x60", "multiple of 8"),
        ("64x1024", "between 8 and 256"),
        ("big", "'big'"),
    ],
)
def test_size_message_is_actionable(value: str, fragment: str) -> None:
    with pytest.raises(ApiError) as info:
        parse(with_field("size", value))
    assert fragment in info.value.message
    assert "auto" in info.value.message


def test_messages_say_given_and_allowed() -> None:
    with pytest.raises(ApiError) as info:
        parse(with_field("n", 9))
    assert "9" in info.value.message and "between 1 and 4" in info.value.message
    with pytest.raises(ApiError) as info:
        parse(with_field("response_format", "url"))
    assert "'url'" in info.value.message and "'b64_json'" in info.value.message
    with pytest.raises(ApiError) as info:
        parse(with_field("model", "dall-e-3"))
    assert "'dall-e-3'" in info.value.message and "'sd-tiny'" in info.value.message


@pytest.mark.parametrize("key", ["prompts", "width", "Prompt", "", "x" * 500, "bad\ud800"])
def test_unknown_field(key: str) -> None:
    with pytest.raises(ApiError) as info:
        parse({"prompt": "a cat", key: 1})
    err = info.value
    assert (err.status, err.code) == (400, "unknown_field")
    assert err.param is not None and len(err.param) <= 256
    err.param.encode("utf-8")  # safe to serialise (no lone surrogates)
    if len(key) < 64 and key.isprintable():
        assert err.param == key
        assert repr(key) in err.message
    json.dumps(err.body(), ensure_ascii=False).encode("utf-8")


def test_non_string_key() -> None:
    with pytest.raises(ApiError) as info:
        parse({"prompt": "a cat", 1: 2})
    assert (info.value.status, info.value.code, info.value.param) == (400, "unknown_field", None)


def test_unknown_field_reported_before_other_errors() -> None:
    with pytest.raises(ApiError) as info:
        parse({"n": "bad", "foo": 1})
    assert (info.value.code, info.value.param) == ("unknown_field", "foo")


@pytest.mark.parametrize(
    "body", [None, [], [{"prompt": "a cat"}], "a cat", 3, 1.5, True, b"{}", ("prompt",)]
)
def test_non_object_body(body: object) -> None:
    with pytest.raises(ApiError) as info:
        parse(body)
    err = info.value
    assert (err.status, err.code, err.param) == (400, "invalid_json", None)
    assert "JSON object" in err.message


def test_api_error_is_value_error_and_repr() -> None:
    err = ApiError(404, "nope", code="model_not_found", param="model")
    assert isinstance(err, ValueError)
    assert str(err) == "nope"
    assert "model_not_found" in repr(err)


# ------------------------------------------------------------------------- parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512x512", (512, 512)), ("1X2", (1, 2)), (" 640x480\n", (640, 480)), ("7x13", (7, 13))],
)
def test_parse_size_without_limits(text: str, expected: tuple[int, int]) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["auto", "0x5", "5x0", "5", "x5", "5x5x5", "", "1e3x2", 512, None])
def test_parse_size_without_limits_rejects(text: object) -> None:
    with pytest.raises(ApiError) as info:
        parse_size(text)
    assert info.value.param == "size"
    assert info.value.code in {"invalid_size", "invalid_type"}


def test_parse_size_with_limits() -> None:
    assert parse_size("auto", LIMITS) == (64, 64)
    assert parse_size("16x24", LIMITS) == (16, 24)
    with pytest.raises(ApiError):
        parse_size("17x24", LIMITS)


def test_parse_size_as_argparse_type() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--size", type=parse_size)
    assert parser.parse_args(["--size", "32x48"]).size == (32, 48)
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--size", "big"])


def test_min_size_override() -> None:
    limits = RequestLimits(
        served_model="m",
        default_size=(64, 64),
        size_multiple=16,
        min_size=32,
        max_size=128,
        default_steps=4,
        default_guidance=0.0,
    )
    assert parse_size("32x128", limits) == (32, 128)
    with pytest.raises(ApiError, match="between 32 and 128"):
        parse_size("16x64", limits)


# -------------------------------------------------------------------- images_response


def test_images_response() -> None:
    resp = images_response(1700000000, [b"\x89PNG one", b"\x89PNG two"], [5, 6])
    assert resp == {
        "created": 1700000000,
        "data": [
            {"b64_json": base64.b64encode(b"\x89PNG one").decode(), "seed": 5},
            {"b64_json": base64.b64encode(b"\x89PNG two").decode(), "seed": 6},
        ],
    }
    json.dumps(resp)


def test_images_response_empty_and_mismatch() -> None:
    assert images_response(1, [], []) == {"created": 1, "data": []}
    with pytest.raises(ValueError, match="2 images but 1 seeds"):
        images_response(1, [b"a", b"b"], [1])


# ------------------------------------------------------------------------- properties

FIELD_NAMES = [
    "prompt", "model", "n", "size", "response_format", "seed", "num_inference_steps",
    "guidance_scale", "negative_prompt", "user", "quality", "style", "output_format",
    "background", "moderation", "output_compression", "partial_images", "stream",
]  # fmt: skip

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-5, max_value=260)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "sd-tiny",
            "auto",
            "64x64",
            "8x256",
            "b64_json",
            "url",
            "png",
            "jpeg",
            "hd",
            "a cat",
            "transparent",
            "opaque",
            "vivid",
            "low",
            " ",
            "9x9",
            "256x264",
        ]
    )
)
_json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=12)
_bodies = (
    st.dictionaries(_keys, _json_values, max_size=8)
    | st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=30)},
        optional={name: _json_values for name in FIELD_NAMES if name != "prompt"},
    )
    | _json_values
)


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(body=_bodies)
def test_property_parse_or_api_error(body: object) -> None:
    try:
        params = parse(body)
    except ApiError as err:
        assert err.status in (400, 404)
        assert err.code
        assert err.message
        assert err.status == 404 or err.code != "model_not_found"
        json.dumps(err.body())
        return
    assert isinstance(params, GenerationParams)
    assert isinstance(params.prompt, str) and params.prompt.strip()
    assert len(params.prompt) <= LIMITS.max_prompt_chars
    assert isinstance(params.negative_prompt, str)
    for side in (params.width, params.height):
        assert LIMITS.min_size <= side <= LIMITS.max_size
        assert side % LIMITS.size_multiple == 0
    assert 1 <= params.num_images <= LIMITS.max_n
    assert 1 <= params.num_inference_steps <= LIMITS.max_steps
    assert isinstance(params.guidance_scale, float)
    assert 0.0 <= params.guidance_scale <= LIMITS.max_guidance
    assert 0 <= params.seed <= MAX_SEED
    for value in (params.num_images, params.num_inference_steps, params.seed):
        assert type(value) is int


def test_a_model_without_negative_prompts_refuses_one_and_says_why() -> None:
    from dataclasses import replace

    limits = replace(LIMITS, no_negative_prompt="FluxPipeline models take no negative prompt")
    with pytest.raises(ApiError) as err:
        parse(with_field("negative_prompt", "blurry"), limits)
    assert (err.value.status, err.value.param, err.value.code) == (
        400,
        "negative_prompt",
        "unsupported_value",
    )
    assert "FluxPipeline models take no negative prompt" in err.value.message
    # An empty one asks for nothing, as the openai client may send it.
    assert parse(with_field("negative_prompt", ""), limits).negative_prompt == ""
    assert parse(with_field("negative_prompt", "blurry")).negative_prompt == "blurry"
