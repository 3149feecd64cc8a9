"""The Videos API routes (videos_http.py) driven by the official `openai` client:
an aiohttp app with add_video_routes and a JobManager whose runner the test controls."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from disagfusion.worker.gateway.jobs import Job, JobFailed, JobManager, VideoOutput
from disagfusion.worker.gateway.jobstore import SqliteJobStore
from disagfusion.worker.gateway.video_api import VideoLimits
from disagfusion.worker.gateway.videos_http import (
    SUGGESTED_CLIENT_MAX_SIZE,
    add_video_routes,
    bearer_auth,
)
from disagfusion.worker.models.families.base import MAX_REFERENCE_SIDE

pytestmark = pytest.mark.timeout(60)

KEY = "sk-video-test"
LIMITS = VideoLimits(
    served_model="wan-tiny",
    model_aliases=("builtin:wan-tiny",),
    default_size=(64, 48),
    size_multiple=16,
    max_size=256,
    default_steps=4,
    default_guidance=5.0,
    default_frames=17,
    max_frames=81,
    default_fps=16,
)


def _png(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size).save(out, format="PNG")
    return out.getvalue()


PNG = _png((8, 8))  # a real image: the gateway reads its header
MP4 = b"\x00\x00\x00\x18ftypmp42fake-mp4"
THUMB = b"\x89PNG\r\n\x1a\nthumbnail"


@dataclass
class Runner:
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    jobs: list[Job] = field(default_factory=list)
    error: JobFailed | None = None

    def __post_init__(self) -> None:
        self.gate.set()  # finish at once unless a test closes the gate

    async def __call__(self, job: Job, on_progress: Callable[[float], None]) -> VideoOutput:
        self.jobs.append(job)
        on_progress(0.5)
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        frames = b"\x93NUMPY" if job.request.keep_frames else None
        return VideoOutput(mp4=MP4, thumbnail_png=THUMB, frames_npy=frames)


@dataclass
class Served:
    url: str
    runner: Runner
    client: openai.AsyncOpenAI
    store: SqliteJobStore


async def _serve(
    tmp_path: Path, client_max_size: int = SUGGESTED_CLIENT_MAX_SIZE, max_active: int = 64
) -> AsyncIterator[Served]:
    store = SqliteJobStore(tmp_path / "jobs")
    runner = Runner()
    manager = JobManager(store, runner, max_active=max_active)
    await manager.start()
    app = web.Application(client_max_size=client_max_size)
    add_video_routes(app, manager, LIMITS, bearer_auth(KEY), poll_after_ms=20)
    server = TestServer(app)
    await server.start_server()
    url = str(server.make_url("/v1"))
    client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
    try:
        yield Served(url, runner, client, store)
    finally:
        await client.close()
        await server.close()
        await manager.close()
        await store.close()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async for s in _serve(tmp_path):
        yield s


# ------------------------------------------------------------------------ the happy path


async def test_create_and_poll_completes(served: Served) -> None:
    video = await served.client.videos.create_and_poll(prompt="a cat surfing", seconds="4")
    assert video.status == "completed" and video.progress == 100
    assert video.id.startswith("video_") and video.object == "video"
    assert (video.model, video.size, video.seconds, video.prompt) == (
        "wan-tiny",
        "64x48",
        "4",
        "a cat surfing",
    )
    assert video.error is None and video.completed_at and video.expires_at
    assert video.expires_at - video.completed_at == 86400
    assert served.runner.jobs[0].request.num_frames == 65  # 4 s at 16 fps


async def test_create_returns_a_queued_job_and_retrieve_follows_it(served: Served) -> None:
    served.runner.gate.clear()
    video = await served.client.videos.create(prompt="a cat", model="builtin:wan-tiny")
    assert (video.status, video.progress, video.model) == ("queued", 0, "wan-tiny")
    while not served.runner.jobs:
        await asyncio.sleep(0.01)
    raw = await served.client.videos.with_raw_response.retrieve(video.id)
    assert raw.headers["openai-poll-after-ms"] == "20"
    running = raw.parse()
    assert (running.status, running.progress) == ("in_progress", 50)
    served.runner.gate.set()
    done = await served.client.videos.poll(video.id)
    assert done.status == "completed"


@pytest.mark.parametrize(
    "reference",
    [("first.png", PNG, "image/png"), PNG],
    ids=["tuple", "bytes"],
)
async def test_create_with_an_input_reference(
    served: Served, reference: tuple[str, bytes, str] | bytes
) -> None:
    video = await served.client.videos.create_and_poll(prompt="it moves", input_reference=reference)
    assert video.status == "completed"
    assert served.runner.jobs[0].reference == PNG


async def test_extensions_arrive_as_extra_form_fields(served: Served) -> None:
    video = await served.client.videos.create_and_poll(
        prompt="a cat",
        extra_body={
            "size": "128x64",
            "num_frames": 33,
            "fps": 8,
            "num_inference_steps": 6,
            "guidance_scale": 3.5,
            "negative_prompt": "blurry",
            "seed": 5,
            "keep_frames": True,
        },
    )
    request = served.runner.jobs[0].request
    assert (request.width, request.height, request.num_frames, request.fps) == (128, 64, 33, 8)
    assert (request.num_inference_steps, request.guidance_scale, request.seed) == (6, 3.5, 5)
    assert (request.negative_prompt, request.keep_frames) == ("blurry", True)
    assert (video.size, video.seconds) == ("128x64", "4")  # round(33 / 8)
    frames = await served.client.videos.download_content(
        video.id, extra_query={"variant": "frames"}
    )
    assert frames.content == b"\x93NUMPY"
    assert frames.response.headers["Content-Type"] == "application/x-npy"


async def test_download_video_and_thumbnail(served: Served) -> None:
    video = await served.client.videos.create_and_poll(prompt="a cat")
    mp4 = await served.client.videos.download_content(video.id)
    assert mp4.content == MP4 and mp4.response.headers["Content-Type"] == "video/mp4"
    thumb = await served.client.videos.download_content(video.id, variant="thumbnail")
    assert thumb.content == THUMB and thumb.response.headers["Content-Type"] == "image/png"
    with pytest.raises(openai.BadRequestError, match="spritesheet"):
        await served.client.videos.download_content(video.id, variant="spritesheet")
    disposition = mp4.response.headers["Content-Disposition"]
    assert disposition == f'attachment; filename="{video.id}.mp4"'


async def test_list_pages_through_every_video(served: Served) -> None:
    ids = [(await served.client.videos.create_and_poll(prompt=f"cat {i}")).id for i in range(5)]
    page = await served.client.videos.list(limit=2)
    assert [v.id for v in page.data] == ids[:-3:-1] and page.has_more
    seen = [v.id async for v in served.client.videos.list(limit=2)]  # follows the cursors
    assert seen == ids[::-1]
    asc = [v.id async for v in served.client.videos.list(limit=3, order="asc")]
    assert asc == ids


async def test_delete(served: Served) -> None:
    video = await served.client.videos.create_and_poll(prompt="a cat")
    deleted = await served.client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        await served.client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        await served.client.videos.download_content(video.id)


async def test_delete_cancels_a_running_video(served: Served) -> None:
    served.runner.gate.clear()
    video = await served.client.videos.create(prompt="a cat")
    while not served.runner.jobs:
        await asyncio.sleep(0.01)
    await served.client.videos.delete(video.id)
    assert [v.id async for v in served.client.videos.list()] == []


async def test_a_failed_video_reports_its_error(served: Served) -> None:
    served.runner.error = JobFailed(500, "the denoiser ran out of memory")
    video = await served.client.videos.create_and_poll(prompt="a cat")
    assert video.status == "failed" and video.error is not None
    assert (video.error.code, video.error.message) == (
        "generation_failed",
        "the denoiser ran out of memory",
    )
    with pytest.raises(openai.ConflictError, match="out of memory"):
        await served.client.videos.download_content(video.id)


async def test_content_before_completion_is_a_conflict(served: Served) -> None:
    served.runner.gate.clear()
    video = await served.client.videos.create(prompt="a cat")
    with pytest.raises(openai.ConflictError, match="poll until completed") as info:
        await served.client.videos.download_content(video.id)
    assert info.value.response.headers["x-should-retry"] == "false"  # retrying cannot help


async def test_a_failing_store_still_answers_json(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(job_id: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(served.store, "get_job", broken)
    with pytest.raises(openai.InternalServerError) as info:
        await served.client.videos.retrieve("video_x")
    assert info.value.code == "internal_error"


# ------------------------------------------------------------------------ errors


async def test_a_wrong_key_is_refused(served: Served) -> None:
    wrong = openai.AsyncOpenAI(base_url=served.url, api_key="nope", max_retries=0)
    try:
        for call in (
            wrong.videos.create(prompt="a cat"),
            wrong.videos.list(),
            wrong.videos.retrieve("video_x"),
            wrong.videos.delete("video_x"),
            wrong.videos.download_content("video_x"),
        ):
            with pytest.raises(openai.AuthenticationError):
                await call
    finally:
        await wrong.close()


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"size": "65x48"}, "size"),
        ({"size": "720x1280"}, "size"),
        ({"num_frames": 16}, "num_frames"),
        ({"num_frames": 85}, "num_frames"),
        ({"fps": 0}, "fps"),
        ({"seconds": "12"}, "seconds"),
        ({"guidance_scale": "lots"}, "guidance_scale"),
        ({"n": 2}, "n"),
    ],
)
async def test_bad_requests_are_400_naming_the_field(
    served: Served, extra: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await served.client.videos.create(prompt="a cat", extra_body=extra)
    assert info.value.param == param
    assert served.runner.jobs == []


async def test_an_unknown_model_is_404(served: Served) -> None:
    with pytest.raises(openai.NotFoundError, match="wan-tiny") as info:
        await served.client.videos.create(prompt="a cat", model="sora-2")
    assert info.value.code == "model_not_found"


async def test_a_reference_that_is_not_an_image_is_400(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await served.client.videos.create(prompt="a cat", input_reference=b"not an image")
    assert info.value.param == "input_reference"


async def test_an_unknown_video_is_404(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await served.client.videos.retrieve("video_nope")
    assert info.value.code == "video_not_found"


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=101", "limit=ten", "order=sideways", "after=video_nope"]
)
async def test_bad_list_queries_are_400(served: Served, query: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{served.url}/videos?{query}", headers={"Authorization": f"Bearer {KEY}"}
        ) as response,
    ):
        assert response.status == 400
        body = await response.json()
    assert body["error"]["param"] == query.split("=")[0]


async def test_too_many_active_videos_is_429_with_retry_after(tmp_path: Path) -> None:
    async for s in _serve(tmp_path, max_active=1):
        s.runner.gate.clear()
        await s.client.videos.create(prompt="a cat")
        with pytest.raises(openai.RateLimitError) as info:
            await s.client.videos.create(prompt="another cat")
        assert int(info.value.response.headers["Retry-After"]) > 0


async def test_a_reference_over_the_body_limit_is_a_json_413(tmp_path: Path) -> None:
    async for s in _serve(tmp_path, client_max_size=1 << 20):
        big = PNG + b"\x00" * (2 << 20)
        with pytest.raises(openai.APIStatusError) as info:
            await s.client.videos.create(prompt="a cat", input_reference=("big.png", big))
        assert info.value.status_code == 413
        assert "1048576 bytes" in info.value.message
        assert s.runner.jobs == []


async def test_a_reference_larger_than_a_stage_takes_is_a_400(served: Served) -> None:
    wide = _png((MAX_REFERENCE_SIDE + 1, 1))
    with pytest.raises(openai.BadRequestError) as info:
        await served.client.videos.create(prompt="a cat", input_reference=("wide.png", wide))
    assert info.value.param == "input_reference"
    assert f"{MAX_REFERENCE_SIDE + 1}x1" in info.value.message
    assert served.runner.jobs == []


async def test_a_json_body_for_curl_users(served: Served) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    body = {
        "prompt": "a cat",
        "num_frames": 17,
        "keep_frames": False,
        "seed": None,
        "input_reference": {"image_url": data_url},
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{served.url}/videos", json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            video = await response.json()
        assert video["status"] == "queued" and video["object"] == "video"
        refused = {"prompt": "a cat", "input_reference": {"file_id": "file_1"}}
        async with session.post(f"{served.url}/videos", json=refused, headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "input_reference"
        async with session.post(f"{served.url}/videos", data=b"[1]", headers=headers) as response:
            assert response.status == 400
    done = await served.client.videos.poll(video["id"])
    assert done.status == "completed"
    assert served.runner.jobs[0].reference == PNG


async def test_owners_are_kept_apart(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "jobs")
    runner = Runner()
    manager = JobManager(store, runner)
    await manager.start()
    keys = {"Bearer sk-a": "owner-a", "Bearer sk-b": "owner-b"}

    def auth(request: web.Request) -> str | web.Response:
        owner = keys.get(request.headers.get("Authorization", ""))
        return owner or web.json_response({"error": {"message": "no"}}, status=401)

    app = web.Application()
    add_video_routes(app, manager, LIMITS, auth, poll_after_ms=20)
    server = TestServer(app)
    await server.start_server()
    url = str(server.make_url("/v1"))
    a = openai.AsyncOpenAI(base_url=url, api_key="sk-a", max_retries=0)
    b = openai.AsyncOpenAI(base_url=url, api_key="sk-b", max_retries=0)
    try:
        video = await a.videos.create_and_poll(prompt="a's cat")
        with pytest.raises(openai.NotFoundError):
            await b.videos.retrieve(video.id)
        with pytest.raises(openai.NotFoundError):
            await b.videos.delete(video.id)
        assert [v.id async for v in b.videos.list()] == []
        assert [v.id async for v in a.videos.list()] == [video.id]
    finally:
        await a.close()
        await b.close()
        await server.close()
        await manager.close()
        await store.close()
