"""Video through `disagfusion serve --local`, as a user runs it: the official
`openai` client's Videos API, `disagfusion generate --video`, and jobs that
survive a gateway killed mid-job (SQLite and a real Redis)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from disagfusion.worker.models import ensure_builtin
from disagfusion.worker.models.video import decode_mp4
from tests.worker.redis_server import RedisServer
from tests.worker.serve_local import ServeLocal, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
PROMPT = "a fox running through snow"
REFERENCE = (np.random.RandomState(0).rand(40, 56, 3) * 255).astype("uint8")


def client(server: ServeLocal) -> Any:
    # Any: openai's type hints allow only OpenAI's own sizes and durations.
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def reference_frames(name: str, body: dict[str, str], image: bool) -> np.ndarray:
    """The diffusers pipeline named in model_index.json, called as documented."""
    path = ensure_builtin(name)
    index = json.loads((path / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    width, height = (int(v) for v in body["size"].split("x"))
    frames = pipe(
        prompt=PROMPT,
        negative_prompt=body.get("negative_prompt"),
        height=height,
        width=width,
        num_frames=int(body["num_frames"]),
        num_inference_steps=int(body["num_inference_steps"]),
        guidance_scale=float(body.get("guidance_scale", 5.0)),
        generator=[torch.Generator().manual_seed(int(body["seed"]))],
        output_type="np",
        **({"image": Image.fromarray(REFERENCE)} if image else {}),
    ).frames
    return (frames[0] * 255).round().astype("uint8")


@pytest.fixture(scope="module", params=["tiny-wan", "tiny-wan-i2v"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ServeLocal]]:
    name = request.param
    logs = tmp_path_factory.mktemp("logs")
    data = tmp_path_factory.mktemp("jobs")
    args = ["--model", f"builtin:{name}", "--denoisers", "2", "--data-dir", str(data)]
    with ServeLocal(logs, *args) as s:
        s.wait_serving()
        yield name, s


def test_openai_client_makes_a_video_equal_to_the_diffusers_pipeline(
    served: tuple[str, ServeLocal],
) -> None:
    name, server = served
    i2v = name.endswith("i2v")
    c = client(server)
    body = {
        "size": "64x48",
        "num_frames": "9",
        "num_inference_steps": "3",
        "seed": "7",
        "negative_prompt": "blurry",
        "keep_frames": "true",
    }
    extra = {k: v for k, v in body.items() if k != "size"}
    kwargs = {"input_reference": ("ref.png", png(REFERENCE), "image/png")} if i2v else {}
    video = c.videos.create_and_poll(
        prompt=PROMPT, size="64x48", poll_interval_ms=200, extra_body=extra, **kwargs
    )
    assert video.status == "completed" and video.progress == 100, video.error
    assert video.expires_at and video.completed_at and video.expires_at > video.completed_at
    mp4 = c.videos.download_content(video.id).read()
    frames, fps = decode_mp4(mp4)
    assert frames.shape == (9, 48, 64, 3) and fps == 16
    thumbnail = Image.open(
        io.BytesIO(c.videos.download_content(video.id, variant="thumbnail").read())
    )
    assert thumbnail.size == (64, 48)
    # The lossless frames (before MP4 encoding) equal the monolithic pipeline's.
    url = f"{server.url}/v1/videos/{video.id}/content?variant=frames"
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.headers["Content-Type"].startswith("application/x-npy")
        lossless = np.load(io.BytesIO(reply.read()))
    want = reference_frames(name, body, image=i2v)
    assert lossless.shape == want.shape == (9, 48, 64, 3)
    assert np.abs(lossless.astype(int) - want.astype(int)).max() <= 1
    assert video.id in [v.id for v in c.videos.list().data]
    deleted = c.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        c.videos.retrieve(video.id)


def test_bad_video_requests_are_400s_naming_the_field(served: tuple[str, ServeLocal]) -> None:
    name, server = served
    c = client(server)
    ref = {"input_reference": ("ref.png", png(REFERENCE), "image/png")} if "i2v" in name else {}
    with pytest.raises(openai.BadRequestError) as err:
        c.videos.create(prompt=PROMPT, size="64x48", extra_body={"num_frames": "8"}, **ref)
    assert err.value.body and "num_frames" in str(err.value.body)
    with pytest.raises(openai.BadRequestError) as err:
        c.videos.create(prompt=PROMPT, size="65x48", **ref)
    assert "size" in str(err.value.body)
    if name.endswith("i2v"):
        with pytest.raises(openai.BadRequestError) as err:
            c.videos.create(prompt=PROMPT, size="64x48")
        assert "input_reference" in str(err.value.body)
    # A video model is not an image model.
    with pytest.raises(openai.BadRequestError) as err:
        c.images.generate(prompt=PROMPT, size="64x48")
    assert "POST /v1/videos" in err.value.message


def test_generate_cli_writes_the_mp4(served: tuple[str, ServeLocal], tmp_path: Path) -> None:
    name, server = served
    out = tmp_path / "fox.mp4"
    argv = [sys.executable, "-m", "disagfusion", "generate", "--video", PROMPT, "-o", str(out)]
    argv += ["--url", server.url, "--frames", "5", "--steps", "2", "--size", "64x48"]
    if name.endswith("i2v"):
        (tmp_path / "ref.png").write_bytes(png(REFERENCE))
        argv += ["--image", str(tmp_path / "ref.png")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "100%" in done.stderr  # the progress bar reached the end
    frames, _ = decode_mp4(out.read_bytes())
    assert frames.shape == (5, 48, 64, 3)


def test_generate_cli_in_process_baseline(tmp_path: Path) -> None:
    out = tmp_path / "fox.mp4"
    argv = [sys.executable, "-m", "disagfusion", "generate", "--video", "--in-process", PROMPT]
    argv += ["--model", "builtin:tiny-wan", "-o", str(out), "--frames", "5", "--steps", "2"]
    subprocess.run([*argv, "--size", "64x48"], check=True, timeout=300)
    assert decode_mp4(out.read_bytes())[0].shape == (5, 48, 64, 3)


def _long_job(c: Any, steps: int = 150, frames: int = 9, size: str = "64x48") -> str:
    # Long enough to kill the gateway while the denoiser works on it.
    extra = {"num_frames": str(frames), "num_inference_steps": str(steps), "seed": "3"}
    return c.videos.create(prompt=PROMPT, size=size, extra_body=extra).id


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_gateway_killed_mid_job_loses_no_job(tmp_path: Path, store: str) -> None:
    with RedisServer(tmp_path / "redis") if store == "redis" else _nothing() as redis:
        args = ["--model", "builtin:tiny-wan"]
        if redis is not None:
            args += ["--job-store", redis.url]
        else:
            args += ["--data-dir", str(tmp_path / "jobs")]
        with ServeLocal(tmp_path / "logs", *args) as server:
            server.wait_serving()
            c = client(server)
            job = _long_job(c)
            wait_until("the job ran", lambda: c.videos.retrieve(job).progress > 0)
            gateway = server.worker("gateway")
            os.kill(gateway.pid, signal.SIGKILL)
            server.wait_for_line("restarting gateway")

            def finished() -> bool:
                try:
                    return c.videos.retrieve(job).status in ("completed", "failed")
                except (openai.APIConnectionError, openai.InternalServerError):
                    return False  # the new gateway is still starting

            wait_until("the job finished after the restart", finished, 300)
            video = c.videos.retrieve(job)
            assert video.status == "completed", video.error
            frames, _ = decode_mp4(c.videos.download_content(job).read())
            assert frames.shape == (9, 48, 64, 3)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_deleting_a_running_job_frees_the_denoiser(tmp_path: Path) -> None:
    args = ["--model", "builtin:tiny-wan", "--data-dir", str(tmp_path / "jobs")]
    with ServeLocal(tmp_path / "logs", *args) as server:
        server.wait_serving()
        c = client(server)
        # Far longer than the test (the API's most steps, a larger clip): if the
        # cancel did not reach the denoiser, the quick job would wait behind it.
        # (150 small steps could end on their own between the first progress
        # report and the delete on a slow machine.)
        job = _long_job(c, steps=200, frames=33, size="128x96")
        wait_until("the job ran", lambda: c.videos.retrieve(job).progress > 0)
        c.videos.delete(job)
        # The next job starts at once: the denoiser dropped the deleted one.
        started = time.monotonic()
        quick = c.videos.create_and_poll(
            prompt=PROMPT,
            size="64x48",
            poll_interval_ms=200,
            extra_body={"num_frames": "5", "num_inference_steps": "2"},
        )
        assert quick.status == "completed"
        assert time.monotonic() - started < 30
        logs = list((tmp_path / "logs").glob("denoiser*.log"))
        wait_until(
            "the denoiser logged the drop", lambda: any("dropped" in p.read_text() for p in logs)
        )
