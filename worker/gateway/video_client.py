"""Client side of `disagfusion generate --video`: a job through the Videos API
(multipart create, poll with a progress bar, download), or the in-process
baseline (the whole diffusers pipeline, then the same MP4 encoding)."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from disagfusion.worker.gateway.client import ClientError, api_base

POLL_DEFAULT_S = 1.0


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type, as the openai client sends."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(f"{head}{value}\r\n".encode())
    for name, (filename, data) in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _call(
    method: str,
    url: str,
    api_key: str | None,
    body: bytes | None = None,
    content_type: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if content_type:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=600) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()
    except (urllib.error.URLError, OSError) as err:
        raise ClientError(
            f"cannot reach {url}: {err}. Is `disagfusion serve --local` running?"
        ) from None


def _json(status: int, raw: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(raw)
    except ValueError:
        reply = {"error": {"message": raw.decode(errors="replace")}}
    if status >= 400:
        error = reply.get("error") or {}
        raise ClientError(f"HTTP {status}: {error.get('message', reply)}")
    return reply if isinstance(reply, dict) else {}


def generate_video_remote(
    base_url: str,
    fields: dict[str, str],
    image: Path | None,
    api_key: str | None = None,
    progress: Callable[[int], None] = lambda percent: None,
) -> bytes:
    """Create a video job, wait for it, and return the MP4."""
    root = api_base(base_url) + "/v1/videos"
    files = {"input_reference": (image.name, image.read_bytes())} if image else {}
    body, content_type = multipart(fields, files)
    video = _json(*_drop_headers(_call("POST", root, api_key, body, content_type)))
    while video.get("status") in ("queued", "in_progress"):
        progress(int(video.get("progress") or 0))
        status, headers, raw = _call("GET", f"{root}/{video['id']}", api_key)
        video = _json(status, raw)
        poll_ms = headers.get("openai-poll-after-ms")
        time.sleep(int(poll_ms) / 1000 if poll_ms and poll_ms.isdigit() else POLL_DEFAULT_S)
    if video.get("status") != "completed":
        error = video.get("error") or {}
        raise ClientError(f"video {video.get('id')} failed: {error.get('message', video)}")
    progress(100)
    status, _, raw = _call("GET", f"{root}/{video['id']}/content", api_key)
    if status != 200:
        _json(status, raw)
    return raw


def _drop_headers(reply: tuple[int, dict[str, str], bytes]) -> tuple[int, bytes]:
    return reply[0], reply[2]


def generate_video_in_process(model: str, fields: dict[str, str], image: Path | None) -> bytes:
    """The monolithic baseline: the whole pipeline here, the gateway's validation."""
    from disagfusion.worker.gateway.api import ApiError
    from disagfusion.worker.gateway.serve import video_limits_for
    from disagfusion.worker.gateway.video_api import parse_video_request
    from disagfusion.worker.gateway.video_runner import video_params
    from disagfusion.worker.models import describe_model, load_stage
    from disagfusion.worker.runtime.serve import encode_videos

    info = describe_model(model)
    if not info.is_video:
        raise ClientError(f"{model} is an image model ({info.pipeline_class}); drop --video")
    limits = video_limits_for(info, info.name, ())
    try:
        request = parse_video_request(fields, image is not None, limits)
    except ApiError as err:
        raise ClientError(f"{err.param or 'request'}: {err.message}") from None
    inputs = {"reference_image": reference_tensor(image.read_bytes())} if image else {}
    stage = load_stage("monolithic", model)
    params = video_params(request)
    video = stage.run(params, inputs)["images"]
    return bytes(encode_videos(video, params)["mp4.0"].numpy().tobytes())


def reference_tensor(data: bytes) -> Any:
    """An uploaded image (PNG, JPEG, WebP) as the uint8 (H, W, 3) tensor stages take."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB")))


def progress_bar(out: TextIO = sys.stderr, width: int = 30) -> Callable[[int], None]:
    """A one-line bar redrawn in place, ending with a newline at 100 %."""
    last = -1

    def show(percent: int) -> None:
        nonlocal last
        if percent == last:
            return
        last = percent
        done = width * percent // 100
        out.write(f"\r[{'#' * done}{' ' * (width - done)}] {percent:3d}%")
        if percent >= 100:
            out.write("\n")
        out.flush()

    return show
