"""/openapi.json: a valid OpenAPI 3.1 document whose request schemas accept exactly
what the validators accept (hypothesis compares the two), served by a real app."""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

from disagfusion.worker.gateway.api import (
    WHITESPACE,
    ApiError,
    RequestLimits,
    image_sides,
    parse_images_request,
    parse_size,
    size_pattern,
)
from disagfusion.worker.gateway.jobs import Job, JobManager, VideoOutput
from disagfusion.worker.gateway.jobstore import SqliteJobStore
from disagfusion.worker.gateway.limits import GatewayLimits
from disagfusion.worker.gateway.openapi import (
    images_request_schema,
    openapi_document,
    video_request_schema,
)
from disagfusion.worker.gateway.service import Gateway, GatewayConfig, build_http_app
from disagfusion.worker.gateway.video_api import VideoLimits, parse_video_request
from disagfusion.worker.gateway.videos_http import add_video_routes, bearer_auth

pytestmark = pytest.mark.timeout(120)

IMAGES = RequestLimits(
    served_model="tiny",
    model_aliases=("builtin:tiny",),
    default_size=(64, 64),
    size_multiple=16,
    max_size=256,
    default_steps=10,
    default_guidance=7.5,
    max_steps=50,
)
VIDEOS = VideoLimits(
    served_model="tiny-wan",
    default_size=(32, 32),
    size_multiple=16,
    max_size=64,
    default_steps=4,
    default_guidance=5.0,
    default_frames=9,
    max_frames=33,
    default_fps=8,
    max_fps=24,
    reference="refused",
)
PROPERTY = settings(
    max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def _gateway(limits: RequestLimits, video: bool = False, api_key: str | None = None) -> Gateway:
    # Nothing listens on the stage address: these tests never generate.
    return Gateway(
        GatewayConfig(
            model=limits.served_model,
            limits=limits,
            first_stage="encoder",
            stage_addrs={"encoder": ["127.0.0.1:9"]},
            result_address="127.0.0.1:9",
            api_key=api_key,
            video=video,
        )
    )


async def _client(app: web.Application) -> TestClient:
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def image_app() -> AsyncIterator[TestClient]:
    gateway = _gateway(IMAGES, api_key="sk-doc")
    client = await _client(build_http_app(gateway))
    yield client
    await client.close()
    await gateway.stop()


class _NeverRuns:
    async def __call__(self, job: Job, on_progress: object) -> VideoOutput:
        raise AssertionError("these tests create no valid video job")


@pytest.fixture
async def video_app(tmp_path: Path) -> AsyncIterator[TestClient]:
    limits = RequestLimits(
        served_model=VIDEOS.served_model,
        default_size=VIDEOS.default_size,
        size_multiple=16,
        max_size=64,
        default_steps=4,
        default_guidance=5.0,
    )
    gateway = _gateway(limits, video=True)
    store = SqliteJobStore(tmp_path / "jobs")
    manager = JobManager(store, _NeverRuns())
    await manager.start()
    app = build_http_app(gateway)
    add_video_routes(app, manager, VIDEOS, bearer_auth(None))
    client = await _client(app)
    yield client
    await client.close()
    await manager.close()
    await store.close()
    await gateway.stop()


# ------------------------------------------------------------------------ the documents


async def test_an_image_gateway_documents_images_and_models(image_app: TestClient) -> None:
    resp = await image_app.get("/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    doc = await resp.json()
    validate(doc)  # raises unless it is a valid OpenAPI 3.1 document
    assert sorted(doc["paths"]) == ["/v1/images/generations", "/v1/models", "/v1/models/{model}"]
    create = doc["paths"]["/v1/images/generations"]["post"]
    assert create["security"] == [{"bearer": []}]
    assert {"200", "400", "401", "404", "413", "429", "500", "503", "504"} <= set(
        create["responses"]
    )
    request = doc["components"]["schemas"]["ImagesRequest"]
    assert request["properties"]["n"] == {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": IMAGES.max_n,
        "description": "Images to generate.",
    }
    assert request["properties"]["num_inference_steps"]["maximum"] == 50
    assert request["properties"]["model"]["enum"] == ["tiny", "builtin:tiny", None]
    assert request["additionalProperties"] is False
    rate_limited = doc["components"]["responses"]["429"]
    assert "Retry-After" in rate_limited["headers"]
    # served again from the cache, identical
    assert await (await image_app.get("/openapi.json")).json() == doc


async def test_a_video_gateway_documents_the_videos_api_not_images(video_app: TestClient) -> None:
    doc = await (await video_app.get("/openapi.json")).json()
    validate(doc)
    assert "/v1/images/generations" not in doc["paths"]
    assert {"/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content"} <= set(
        doc["paths"]
    )
    assert "security" not in doc["paths"]["/v1/videos"]["post"]  # no API key configured
    form = doc["components"]["schemas"]["VideoRequest"]
    assert form["properties"]["num_frames"]["enum"] == [1, 5, 9, 13, 17, 21, 25, 29, 33]
    assert "input_reference" not in form["properties"]  # a text-to-video model refuses one
    assert "413" in doc["paths"]["/v1/videos"]["post"]["responses"]
    assert str(32 << 20) in doc["components"]["responses"]["413"]["description"]


def test_documents_without_auth_or_rate_limit_still_validate() -> None:
    doc = openapi_document(
        images=IMAGES,
        videos=VIDEOS,
        auth=False,
        http=GatewayLimits(rate_per_s=0),
        max_body_bytes=1 << 20,
    )
    validate(doc)
    assert "securitySchemes" not in doc["components"]
    assert "no per-client rate limit" in doc["components"]["responses"]["429"]["description"]


# ------------------------------------------------------------------- schema == validator


def test_the_whitespace_class_is_pythons() -> None:
    whitespace = {chr(c) for c in range(0x110000) if chr(c).isspace()}
    matched = {chr(c) for c in range(0x110000) if re.fullmatch(f"[{WHITESPACE}]", chr(c))}
    assert matched == whitespace


_SPACES = st.sampled_from(["", " ", "\t", "\n", "\x1c", "\u3000", "\ufeff", "\xa0", "  "])
_SIDES = st.one_of(
    st.sampled_from(list(image_sides(IMAGES))).map(str),
    st.integers(0, 300).map(str),
    st.tuples(st.integers(0, 9), st.sampled_from([16, 64, 256])).map(
        lambda z: "0" * z[0] + str(z[1])
    ),
    st.sampled_from(["", "-16", "+16", "1e2", "\uff16\uff14", "16.0", "99999999999"]),
)
_SIZES = st.one_of(
    st.builds(
        lambda a, w, x, h, b: f"{a}{w}{x}{h}{b}",
        _SPACES,
        _SIDES,
        st.sampled_from(["x", "X", "*", "", "xx"]),
        _SIDES,
        _SPACES,
    ),
    st.builds(
        lambda a, s, b: f"{a}{s}{b}", _SPACES, st.sampled_from(["auto", "AUTO", "Auto"]), _SPACES
    ),
    st.text(max_size=12),
)


def _parses(text: str) -> bool:
    try:
        parse_size(text, IMAGES)
    except ApiError:
        return False
    return True


@PROPERTY
@given(_SIZES)
def test_the_size_pattern_accepts_exactly_what_parse_size_accepts(text: str) -> None:
    pattern = size_pattern(image_sides(IMAGES), auto=True)
    assert (re.search(pattern, text) is not None) == _parses(text), repr(text)


_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([2.0, 50.0, 0.5, 1e300]),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1),
)
_ANY_FIELDS = [
    "n",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "user",
    "style",
    "moderation",
    "output_compression",
    "partial_images",
    "unknown",
]
_IMAGE_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["tiny", "builtin:tiny", "dall-e-3", "", None]),
    "size": st.one_of(_SIZES, _ANY),
    "response_format": st.sampled_from(["b64_json", "url", "png", None, 1]),
    "negative_prompt": st.one_of(st.text(max_size=6), _ANY),
    "quality": st.sampled_from(["auto", "hd", "ultra", None]),
    "background": st.sampled_from(["auto", "opaque", "transparent", "none"]),
    "output_format": st.sampled_from(["png", "jpeg", "gif"]),
    "stream": st.sampled_from([True, False, None, 0, "false"]),
    **dict.fromkeys(_ANY_FIELDS, _ANY),
}
_PROMPTS = st.one_of(
    st.sampled_from(["a cat", "猫", "\u3000x", " ", "", "x" * 4001]), st.text(max_size=6), _ANY
)
# Values at and around each bound, so that many bodies are valid and many just not.
_NEAR_VALID: dict[str, st.SearchStrategy[Any]] = {
    "n": st.sampled_from([0, 1, 4, 5, 2.0, None]),
    "seed": st.sampled_from([-1, 0, 2**63 - 1, 2**63, 7.0, None]),
    "num_inference_steps": st.integers(0, 51),
    "guidance_scale": st.floats(-0.5, 51),
    "size": _SIZES,
    "model": st.sampled_from(["tiny", "builtin:tiny", None]),
    "output_compression": st.integers(-1, 101),
    "partial_images": st.integers(-1, 4),
    "style": st.sampled_from(["vivid", "natural", "dark"]),
    "moderation": st.sampled_from(["auto", "low", "high"]),
    "user": st.text(max_size=4),
}


def _one_field(values: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid body with one field varied: each bound decides alone."""
    return st.sampled_from(sorted(values)).flatmap(
        lambda key: values[key].map(lambda value: {"prompt": "a cat", key: value})
    )


_IMAGE_BODIES = st.one_of(
    _one_field(_NEAR_VALID),
    _one_field(_IMAGE_VALUES),
    st.fixed_dictionaries({"prompt": st.just("a cat")}, optional=_NEAR_VALID),
    st.fixed_dictionaries({"prompt": _PROMPTS}, optional=_IMAGE_VALUES),
    st.dictionaries(st.sampled_from(["prompt", *_IMAGE_VALUES]), _ANY, max_size=4),
)


def _image_ok(body: dict[str, Any]) -> bool:
    try:
        parse_images_request(body, IMAGES, default_seed=lambda: 1)
    except ApiError:
        return False
    return True


@PROPERTY
@given(_IMAGE_BODIES)
def test_the_images_schema_accepts_exactly_what_the_validator_accepts(body: dict[str, Any]) -> None:
    schema = images_request_schema(IMAGES)
    valid = jsonschema.Draft202012Validator(schema).is_valid(body)
    assert valid == _image_ok(body), body


def _form_text(value: object) -> str:
    """What a multipart client writes for a typed value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else repr(value)


_INTS = st.one_of(
    st.integers(-2, 70),
    st.integers(),
    st.booleans(),
    st.floats(allow_nan=False).filter(lambda f: not f.is_integer()),
    st.sampled_from(["", "five", "1e3"]),
)
_VIDEO_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["tiny-wan", "sora-2", ""]),
    "size": st.one_of(st.sampled_from(["16x16", "32X64", " 64x48", "64x64 ", "80x80", "15x16"])),
    "seconds": _INTS,
    "num_frames": _INTS,
    "fps": _INTS,
    "num_inference_steps": _INTS,
    "seed": _INTS,
    "guidance_scale": st.one_of(st.floats(allow_nan=True), st.integers(-1, 60), st.just("x")),
    "negative_prompt": st.text(max_size=5),
    "keep_frames": st.sampled_from([True, False, 0, 1, 2, "yes"]),
    "colour": st.just("red"),
}
_VIDEO_FIELDS = st.one_of(
    _one_field(_VIDEO_VALUES),
    st.fixed_dictionaries(
        {"prompt": st.one_of(st.sampled_from(["a fox", " ", "\u2003"]), st.text(max_size=4))},
        optional=_VIDEO_VALUES,
    ),
)


def _video_ok(fields: dict[str, str]) -> bool:
    try:
        parse_video_request(fields, False, VIDEOS, default_seed=lambda: 1)
    except ApiError:
        return False
    return True


@PROPERTY
@given(_VIDEO_FIELDS)
def test_the_video_form_schema_accepts_exactly_what_the_validator_accepts(
    typed: dict[str, Any],
) -> None:
    schema = video_request_schema(VIDEOS)
    valid = jsonschema.Draft202012Validator(schema).is_valid(typed)
    fields = {key: _form_text(value) for key, value in typed.items()}
    assert valid == _video_ok(fields), (typed, fields)


def test_the_seconds_rule_follows_the_frame_limit() -> None:
    check = jsonschema.Draft202012Validator(video_request_schema(VIDEOS)).is_valid
    longest = VIDEOS.max_seconds(VIDEOS.default_fps)  # 33 frames at 8 fps: 4 s
    assert longest == 4
    assert check({"prompt": "a", "seconds": longest})
    assert not check({"prompt": "a", "seconds": longest + 1})
    assert check({"prompt": "a", "seconds": 32, "fps": 1})
    assert not check({"prompt": "a", "seconds": 2, "fps": 24})
    assert check({"prompt": "a", "seconds": 99, "num_frames": 5})  # num_frames wins
    assert math.isfinite(VIDEOS.max_guidance)


# ------------------------------------------------------------------ documented error bodies


async def _error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body: dict[str, Any] = await resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_an_unknown_charset_is_a_400_not_a_500(image_app: TestClient) -> None:
    headers = {"Authorization": "Bearer sk-doc", "Content-Type": "application/json; charset=nope"}
    resp = await image_app.post("/v1/images/generations", data=b'{"prompt": "a"}', headers=headers)
    error = await _error(resp, 400)
    assert "nope" in error["message"]


@pytest.mark.parametrize(
    ("content_type", "body", "fragment"),
    [
        ("multipart/form-data", b"x", "boundary"),
        ("multipart/form-data; boundary=b", b"--other\r\n\r\nx", "boundary"),
        ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="a"', ""),
        ("application/json; charset=nope", b'{"prompt": "a"}', ""),
    ],
)
async def test_a_malformed_video_body_is_a_400_not_a_500(
    video_app: TestClient, content_type: str, body: bytes, fragment: str
) -> None:
    resp = await video_app.post("/v1/videos", data=body, headers={"Content-Type": content_type})
    error = await _error(resp, 400)
    assert fragment in error["message"]


@pytest.mark.parametrize("limit", ["²", "٣", "0", "101", "1.5", "-1"])
async def test_a_list_limit_that_is_not_1_to_100_in_ascii_digits_is_a_400(
    video_app: TestClient, limit: str
) -> None:
    error = await _error(await video_app.get("/v1/videos", params={"limit": limit}), 400)
    assert error["param"] == "limit"
