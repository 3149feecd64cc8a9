"""Video jobs run through the gateway's pipeline: the JobManager's runner."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from disagfusion.worker.gateway.jobs import Job, JobFailed, Runner, VideoOutput
from disagfusion.worker.gateway.video_api import VideoRequest
from disagfusion.worker.params import GenerationParams

if TYPE_CHECKING:
    from disagfusion.worker.gateway.service import Gateway


def video_params(request: VideoRequest) -> GenerationParams:
    """The pipeline's parameters for a validated video request: one video."""
    return GenerationParams(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=request.width,
        height=request.height,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        seed=request.seed,
        num_frames=request.num_frames,
        fps=request.fps,
        keep_frames=request.keep_frames,
    )


# A job waits out these instead of failing: the pipeline is full (429) or not
# ready yet (503: e.g. a restarted gateway that has not polled its stages).
RETRIED = (429, 503)


def video_runner(
    gateway: Gateway, timeout_s: float, clock: Callable[[], float] = time.monotonic
) -> Runner:
    """Each attempt is a new request in the stages (a job id plus a suffix): a
    resubmitted job never collides with what its first attempt left behind."""
    from disagfusion.worker.gateway.service import RequestFailed
    from disagfusion.worker.gateway.video_client import reference_tensor

    async def run(job: Job, on_progress: Callable[[float], None]) -> VideoOutput:
        tensors = None
        if job.reference is not None:
            try:
                tensors = {"reference_image": reference_tensor(job.reference)}
            except Exception as err:  # the upload passed the magic-byte check only
                raise JobFailed(400, f"input_reference is not a readable image: {err}") from None
        give_up = clock() + timeout_s
        while True:
            try:
                result = await gateway.generate(
                    video_params(job.request),
                    job.id,
                    from_client=True,
                    tensors=tensors,
                    on_progress=on_progress,
                    timeout_s=timeout_s,
                )
                break
            except RequestFailed as err:
                if err.status not in RETRIED or clock() > give_up or gateway.draining:
                    raise JobFailed(err.status, err.message) from None
                await asyncio.sleep(min(err.retry_after_s or 1, 5))
        frames = _npy(result.frames[0]) if result.frames else None
        return VideoOutput(mp4=result.videos[0], thumbnail_png=result.pngs[0], frames_npy=frames)

    return run


def _npy(frames: object) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(frames))
    return buf.getvalue()
