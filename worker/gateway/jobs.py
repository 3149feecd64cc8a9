"""Video generation as durable jobs: the job model and the manager that runs them.

A job is stored (with its input image) before ``create`` returns, so it is
never lost: the manager runs it in a background task, persists its progress and
outcome, and on the next start (of this or another gateway replica sharing the
store) resumes whatever was queued or running. Replicas coordinate by leases:
the instance running a job renews its lease; a lease that lapses (a crashed
replica) lets exactly one other replica claim the job and run it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from disagfusion.worker.gateway.video_api import VideoRequest, video_object

if TYPE_CHECKING:
    from disagfusion.worker.gateway.jobstore import JobStore

log = logging.getLogger(__name__)

__all__ = [
    "MAX_ATTEMPTS",
    "ContentUnavailable",
    "Job",
    "JobError",
    "JobFailed",
    "JobManager",
    "JobNotFound",
    "JobsFull",
    "Runner",
    "VideoOutput",
]

JobStatus = Literal["queued", "in_progress", "completed", "failed"]
ACTIVE: tuple[JobStatus, ...] = ("queued", "in_progress")
MAX_ATTEMPTS = 3  # runs of one job cut short by a gateway restart before it is failed
REFERENCE_BLOB = "input_reference"
# variant -> (blob name, content type)
VARIANTS = {
    "video": ("video", "video/mp4"),
    "thumbnail": ("thumbnail", "image/png"),
    "frames": ("frames", "application/x-npy"),
}
_FAILURE_CODES = {
    400: "invalid_request",
    429: "pipeline_full",
    503: "not_ready",
    504: "deadline_exceeded",
}


# ------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class VideoOutput:
    mp4: bytes
    thumbnail_png: bytes
    frames_npy: bytes | None = None  # uint8 (frames, height, width, 3), if keep_frames


class JobFailed(Exception):
    """Raised by a runner: the job ends failed with this status and message."""

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _FAILURE_CODES.get(status, "generation_failed")


Runner = Callable[["Job", Callable[[float], None]], Awaitable[VideoOutput]]


@dataclass
class Job:
    id: str
    owner: str  # sha256 hex of the caller's API key; "" when the gateway has none
    request: VideoRequest
    created_at: float
    has_reference: bool = False
    # Loaded from the store only to run the job; never part of the job record.
    reference: bytes | None = field(default=None, repr=False, compare=False)
    status: JobStatus = "queued"
    progress: int = 0  # percent
    started_at: float | None = None
    completed_at: float | None = None  # completed or failed
    expires_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0  # runs started

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


def new_job_id() -> str:
    return "video_" + uuid.uuid4().hex


def job_to_record(job: Job) -> dict[str, Any]:
    """The JSON-able record a store keeps (without the reference image)."""
    record = dataclasses.asdict(dataclasses.replace(job, reference=None))
    del record["reference"]
    return record


def job_from_record(record: dict[str, Any]) -> Job:
    fields = dict(record)
    fields["request"] = VideoRequest(**fields["request"])
    return Job(**fields)


def started(job: Job, now: float) -> None:
    job.status, job.started_at, job.attempts = "in_progress", now, job.attempts + 1


def requeued(job: Job) -> None:
    """Back to queued for a resumed run (progress restarts with it)."""
    job.status, job.progress = "queued", 0


def completed(job: Job, now: float, retention_s: float) -> None:
    job.status, job.progress = "completed", 100
    job.completed_at, job.expires_at = now, now + retention_s


def failed(job: Job, now: float, retention_s: float, code: str, message: str) -> None:
    # Failed jobs expire too, so the store does not grow forever.
    job.status, job.error_code, job.error_message = "failed", code, message
    job.completed_at, job.expires_at = now, now + retention_s


def progressed(job: Job, fraction: float) -> bool:
    """Record a runner's progress (0..1); True when the percentage rose."""
    if not math.isfinite(fraction):
        return False
    percent = max(0, min(99, int(fraction * 100)))
    if percent <= job.progress:
        return False
    job.progress = percent
    return True


# ------------------------------------------------------------------------ errors


class JobError(Exception):
    """A request about jobs that the HTTP layer answers with ``status``."""

    status = 400

    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


class JobNotFound(JobError):
    status = 404

    def __init__(self, job_id: str) -> None:
        super().__init__(
            f"No video with id {job_id[:80]!r}.", code="video_not_found", param="video_id"
        )


class JobsFull(JobError):
    status = 429

    def __init__(self, max_active: int, retry_after_s: int = 10) -> None:
        super().__init__(
            f"This gateway already has {max_active} videos queued or in progress; retry later.",
            code="too_many_jobs",
        )
        self.retry_after_s = retry_after_s


class ContentUnavailable(JobError):
    """Content of a job that is not completed, has expired, or was not kept."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)
        self.status = status


class UnknownCursor(LookupError):
    """A list cursor (``after``) that names no job of the caller's."""


# ------------------------------------------------------------------------ the manager


def default_instance_id() -> str:
    # Stable across a container restart (same pod name, pid 1), so a restarted
    # gateway resumes its own jobs at once instead of waiting out their leases.
    return f"{socket.gethostname()}:{os.getpid()}"


class JobManager:
    """Runs video jobs durably; see the module docstring."""

    def __init__(
        self,
        store: JobStore,
        runner: Runner,
        *,
        clock: Callable[[], float] = time.time,
        retention_s: float = 86400.0,
        max_active: int = 64,
        max_running: int = 4,
        lease_s: float = 30.0,
        instance_id: str | None = None,
        sweep_every_s: float = 60.0,
        recover_every_s: float | None = None,
        progress_every_s: float = 0.5,
    ) -> None:
        self._store = store
        self._runner = runner
        self._clock = clock
        self.retention_s = retention_s
        self.max_active = max_active
        self.lease_s = lease_s
        self.instance_id = instance_id or default_instance_id()
        self._sweep_every_s = sweep_every_s
        self._recover_every_s = recover_every_s or lease_s / 2
        self._progress_every_s = progress_every_s
        self._slots = asyncio.Semaphore(max_running)  # runs at once; the rest stay queued
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._live: dict[str, Job] = {}  # the jobs this instance holds, as they change
        self._loops: list[asyncio.Task[None]] = []

    # ---- lifecycle ------------------------------------------------------

    async def start(self) -> None:
        """Sweep expired jobs, resume interrupted ones, start the background loops."""
        await self._sweep()
        await self._recover()
        self._loops = [
            asyncio.create_task(self._every(self._sweep_every_s, self._sweep)),
            asyncio.create_task(self._every(self._recover_every_s, self._recover)),
            asyncio.create_task(self._every(self.lease_s / 3, self._renew)),
        ]

    async def close(self, *, release_leases: bool = True) -> None:
        """Stop every run WITHOUT failing its job: the next start resumes them.

        Released leases let another replica take the jobs over at once;
        ``release_leases=False`` leaves them to lapse, as a crash would."""
        for loop in self._loops:
            loop.cancel()
        held = list(self._tasks)
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks.values(), return_exceptions=True)
        self._loops.clear()
        if release_leases:
            for job_id in held:
                with contextlib.suppress(Exception):
                    await self._store.release(job_id, self.instance_id)

    def active_count(self) -> int:
        """Jobs queued or running on this instance (admission counts these)."""
        return len(self._tasks)

    # ---- requests -------------------------------------------------------

    async def create(self, owner: str, request: VideoRequest, reference: bytes | None) -> Job:
        """Store a new job (with its reference image) and start it; raises JobsFull."""
        if self.active_count() >= self.max_active:
            raise JobsFull(self.max_active)
        now = self._clock()
        job = Job(
            id=new_job_id(),
            owner=owner,
            request=request,
            created_at=now,
            has_reference=reference is not None,
            reference=reference,
        )
        await self._store.add_job(job, reference, self.instance_id, now + self.lease_s)
        self._launch(job)
        return dataclasses.replace(job)

    async def get(self, owner: str, job_id: str) -> Job:
        live = self._live.get(job_id)
        job = dataclasses.replace(live) if live else await self._store.get_job(job_id)
        if job is None or job.owner != owner:
            raise JobNotFound(job_id)
        return job

    async def list(
        self, owner: str, after: str | None = None, limit: int = 20, order: str = "desc"
    ) -> dict[str, Any]:
        """OpenAI's cursor page of the owner's jobs, newest first by default."""
        try:
            jobs = await self._store.list_jobs(owner, after, limit + 1, order)
        except UnknownCursor:
            raise JobError(
                f"Invalid 'after': {(after or '')[:80]!r} names none of your videos.",
                code="invalid_value",
                param="after",
            ) from None
        page = [self._live.get(job.id, job) for job in jobs[:limit]]
        return {
            "object": "list",
            "data": [video_object(job) for job in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(jobs) > limit,
        }

    async def delete(self, owner: str, job_id: str) -> dict[str, Any]:
        """Cancel the job if it runs here, and remove it with its content."""
        await self.get(owner, job_id)
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # A replica running it notices at its next lease renewal and stops.
        await self._store.delete_job(job_id)
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    async def content(self, owner: str, job_id: str, variant: str = "video") -> tuple[bytes, str]:
        """(bytes, content type) of a completed job's video, thumbnail or frames."""
        job = await self.get(owner, job_id)
        if variant not in VARIANTS:
            raise ContentUnavailable(
                400,
                f"Invalid 'variant': {variant[:40]!r}; use one of {', '.join(VARIANTS)}.",
                "invalid_value",
                "variant",
            )
        if job.status != "completed":
            detail = (
                f": {job.error_message}" if job.status == "failed" else "; poll until completed"
            )
            raise ContentUnavailable(
                409, f"Video {job_id} is {job.status}{detail}.", "video_not_ready"
            )
        if variant == "frames" and not job.request.keep_frames:
            raise ContentUnavailable(
                400,
                f"Video {job_id} kept no frames; create it with keep_frames=true.",
                "variant_not_available",
                "variant",
            )
        expired = job.expires_at is not None and job.expires_at <= self._clock()
        name, content_type = VARIANTS[variant]
        data = None if expired else await self._store.get_blob(job_id, name)
        if data is None:
            raise ContentUnavailable(
                410, f"The content of video {job_id} has expired.", "video_expired"
            )
        return data, content_type

    # ---- running --------------------------------------------------------

    def _launch(self, job: Job) -> None:
        self._live[job.id] = job
        task = asyncio.create_task(self._run(job), name=f"video-job-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda t: self._ended(job.id, t))

    def _ended(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        self._live.pop(job_id, None)
        if not task.cancelled() and task.exception() is not None:
            # e.g. the store went away: the lease lapses and a recovery scan reruns it
            log.error("video job %s stopped", job_id, exc_info=task.exception())

    async def _run(self, job: Job) -> None:
        async with self._slots:
            if job.has_reference and job.reference is None:
                job.reference = await self._store.get_blob(job.id, REFERENCE_BLOB)
                if job.reference is None:
                    await self._finish_failed(
                        job, "payload_missing", "the stored input_reference image is missing"
                    )
                    return
            started(job, self._clock())
            if not await self._store.update_job(job):
                return  # deleted meanwhile
            try:
                output = await self._with_progress(job)
            except JobFailed as err:
                await self._finish_failed(job, err.code, err.message)
                return
            except Exception as err:  # a bug in the runner must still end the job
                log.exception("video job %s: the runner crashed", job.id)
                await self._finish_failed(job, "internal_error", f"{type(err).__name__}: {err}")
                return
            await self._finish_completed(job, output)

    async def _with_progress(self, job: Job) -> VideoOutput:
        """Run the runner; a side task persists its progress, throttled."""
        dirty, done = asyncio.Event(), asyncio.Event()

        def on_progress(fraction: float) -> None:
            if progressed(job, fraction):
                dirty.set()

        async def write_progress() -> None:
            while True:
                await dirty.wait()
                dirty.clear()
                if done.is_set():
                    return
                await self._store.update_job(job)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), self._progress_every_s)

        writer = asyncio.create_task(write_progress())
        try:
            return await self._runner(job, on_progress)
        finally:
            # Let a write in flight land before the outcome is written (never cancel it).
            done.set()
            dirty.set()
            await asyncio.gather(writer, return_exceptions=True)

    async def _finish_completed(self, job: Job, output: VideoOutput) -> None:
        blobs = {"video": output.mp4, "thumbnail": output.thumbnail_png}
        if job.request.keep_frames and output.frames_npy is not None:
            blobs["frames"] = output.frames_npy
        for name, data in blobs.items():
            await self._store.put_blob(job.id, name, data)
        completed(job, self._clock(), self.retention_s)
        await self._save_outcome(job)

    async def _finish_failed(self, job: Job, code: str, message: str) -> None:
        failed(job, self._clock(), self.retention_s, code, message)
        await self._save_outcome(job)

    async def _save_outcome(self, job: Job) -> None:
        if await self._store.update_job(job):
            await self._store.release(job.id, self.instance_id)
        else:  # deleted while finishing: drop the blobs just written
            await self._store.delete_job(job.id)

    # ---- background loops ---------------------------------------------------

    async def _every(self, interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await step()
            except Exception:
                log.exception("video jobs: %s failed; retrying in %gs", step.__name__, interval_s)

    async def _sweep(self) -> None:
        """Delete finished jobs past their expiry, with their content."""
        now = self._clock()
        for job_id in await self._store.expired_jobs(now):
            if job_id not in self._tasks:
                await self._store.delete_job(job_id)
        await self._store.remove_orphans(now)

    async def _renew(self) -> None:
        """Extend the leases of the jobs held here; stop those another replica took."""
        for job_id, task in list(self._tasks.items()):
            now = self._clock()
            if not await self._store.claim(job_id, self.instance_id, now + self.lease_s, now):
                log.warning("video job %s: lease lost (taken over or deleted); stopping", job_id)
                task.cancel()

    async def _recover(self) -> None:
        """Take over queued or running jobs whose lease lapsed (or that were ours)."""
        now = self._clock()
        for job_id in await self._store.jobs_to_recover(now, self.instance_id):
            if job_id in self._tasks:
                continue
            now = self._clock()
            if not await self._store.claim(job_id, self.instance_id, now + self.lease_s, now):
                continue  # another replica won it
            job = await self._store.get_job(job_id)
            if job is None or not job.active:
                await self._store.release(job_id, self.instance_id)
                continue
            if job.attempts >= MAX_ATTEMPTS:
                log.warning("video job %s: failed after %d attempts", job_id, job.attempts)
                await self._finish_failed(
                    job,
                    "gateway_restarted",
                    f"the gateway restarted {job.attempts} times while running this job",
                )
                continue
            log.info("video job %s: resuming (attempt %d)", job_id, job.attempts + 1)
            requeued(job)
            await self._store.update_job(job)
            self._launch(job)
