"""Durable video jobs: JobManager over both real stores (SQLite in a temp dir, and
a real redis-server on a loopback port), with a runner the tests drive."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from disagfusion.worker.gateway.jobs import (
    MAX_ATTEMPTS,
    ContentUnavailable,
    Job,
    JobError,
    JobFailed,
    JobManager,
    JobNotFound,
    JobsFull,
    VideoOutput,
)
from disagfusion.worker.gateway.jobstore import (
    JobStore,
    RedisJobStore,
    SqliteJobStore,
    open_job_store,
)
from disagfusion.worker.gateway.video_api import VideoRequest
from tests.worker.redis_server import RedisServer

pytestmark = pytest.mark.timeout(60)

REQUEST = VideoRequest(
    prompt="a cat surfing",
    model="wan-tiny",
    width=64,
    height=48,
    num_frames=17,
    fps=16,
    num_inference_steps=4,
    guidance_scale=5.0,
    seed=7,
    seconds="1",
)
KEPT = VideoRequest(**{**REQUEST.__dict__, "keep_frames": True})
PNG = b"\x89PNG\r\n\x1a\nreference"
RETENTION = 1000.0


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def until_async(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeRunner:
    """Blocks each job until the test says how it ends."""

    def __init__(self, name: str = "runner", *, auto: bool = False) -> None:
        self.name = name
        self.auto = auto  # complete at once
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.references: dict[str, bytes | None] = {}
        self.progress: dict[str, Callable[[float], None]] = {}
        self._outcomes: dict[str, asyncio.Future[VideoOutput]] = {}

    def _outcome(self, job_id: str) -> asyncio.Future[VideoOutput]:
        if job_id not in self._outcomes:
            self._outcomes[job_id] = asyncio.get_running_loop().create_future()
        return self._outcomes[job_id]

    def finish(self, job_id: str) -> None:
        self._outcome(job_id).set_result(output_for(job_id))

    def fail(self, job_id: str, error: BaseException) -> None:
        self._outcome(job_id).set_exception(error)

    async def __call__(self, job: Job, on_progress: Callable[[float], None]) -> VideoOutput:
        self.started.append(job.id)
        self.references[job.id] = job.reference
        self.progress[job.id] = on_progress
        if self.auto:
            return output_for(job.id)
        outcome = self._outcome(job.id)
        try:
            return await asyncio.shield(outcome)
        except asyncio.CancelledError:
            self.cancelled.append(job.id)
            raise
        finally:
            self._outcomes.pop(job.id, None)


def output_for(job_id: str) -> VideoOutput:
    return VideoOutput(
        mp4=b"mp4:" + job_id.encode(),
        thumbnail_png=b"png:" + job_id.encode(),
        frames_npy=b"npy:" + job_id.encode(),
    )


# ------------------------------------------------------------------------ redis-server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


# ------------------------------------------------------------------------ fixtures


class Backend:
    """Opens store objects on one backing store, as separate processes would."""

    def __init__(self, kind: str, tmp_path: Path, redis_url: str | None) -> None:
        self.kind = kind
        self.dir = tmp_path / "jobs"
        self.redis_url = redis_url
        self.prefix = f"test:{uuid.uuid4().hex}:"
        self.opened: list[JobStore] = []

    def open(self) -> JobStore:
        store: JobStore
        if self.kind == "sqlite":
            store = SqliteJobStore(self.dir)
        else:
            assert self.redis_url
            store = RedisJobStore(self.redis_url, prefix=self.prefix)
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    b = Backend(request.param, tmp_path, url)
    yield b
    for store in b.opened:
        await store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


class Managers:
    def __init__(self, backend: Backend, clock: Clock) -> None:
        self.backend, self.clock = backend, clock
        self.all: list[JobManager] = []

    async def start(self, runner: FakeRunner, **kwargs: Any) -> JobManager:
        options: dict[str, Any] = {
            "clock": self.clock,
            "retention_s": RETENTION,
            "lease_s": 10.0,
            "recover_every_s": 0.05,
            "progress_every_s": 0.05,
            "instance_id": f"instance-{len(self.all)}",
            **kwargs,
        }
        manager = JobManager(self.backend.open(), runner, **options)
        self.all.append(manager)
        await manager.start()
        return manager


@pytest.fixture
async def managers(backend: Backend, clock: Clock) -> AsyncIterator[Managers]:
    m = Managers(backend, clock)
    yield m
    for manager in m.all:
        await manager.close()


async def stored(manager: JobManager, job_id: str) -> Job | None:
    return await manager._store.get_job(job_id)


# ------------------------------------------------------------------------ lifecycle


async def test_a_job_goes_queued_in_progress_completed(managers: Managers, clock: Clock) -> None:
    runner = FakeRunner()
    manager = await managers.start(runner)
    job = await manager.create("alice", REQUEST, None)
    assert job.status == "queued" and job.id.startswith("video_") and len(job.id) == 38
    assert (await stored(manager, job.id)) is not None  # stored before create returned

    await until(lambda: job.id in runner.started)
    running = await manager.get("alice", job.id)
    assert (running.status, running.attempts, running.started_at) == ("in_progress", 1, clock.now)

    runner.progress[job.id](0.5)
    assert (await manager.get("alice", job.id)).progress == 50

    async def persisted() -> bool:
        job_now = await stored(manager, job.id)
        return job_now is not None and job_now.progress == 50

    await until_async(persisted)

    clock.now += 12.0
    runner.finish(job.id)
    await until(lambda: manager.active_count() == 0)
    done = await manager.get("alice", job.id)
    assert (done.status, done.progress, done.completed_at) == ("completed", 100, clock.now)
    assert done.expires_at == clock.now + RETENTION
    assert done.error_code is None

    assert await manager.content("alice", job.id, "video") == (
        b"mp4:" + job.id.encode(),
        "video/mp4",
    )
    assert await manager.content("alice", job.id, "thumbnail") == (
        b"png:" + job.id.encode(),
        "image/png",
    )
    with pytest.raises(ContentUnavailable) as info:
        await manager.content("alice", job.id, "frames")
    assert (info.value.status, info.value.param) == (400, "variant")
    assert "keep_frames" in info.value.message


async def test_kept_frames_are_served(managers: Managers) -> None:
    runner = FakeRunner(auto=True)
    manager = await managers.start(runner)
    job = await manager.create("alice", KEPT, None)
    await until(lambda: manager.active_count() == 0)
    assert await manager.content("alice", job.id, "frames") == (
        b"npy:" + job.id.encode(),
        "application/x-npy",
    )


async def test_content_of_an_unfinished_job_is_a_clear_error(managers: Managers) -> None:
    runner = FakeRunner()
    manager = await managers.start(runner)
    job = await manager.create("alice", REQUEST, None)
    with pytest.raises(ContentUnavailable) as info:
        await manager.content("alice", job.id)
    assert (info.value.status, info.value.code) == (409, "video_not_ready")
    with pytest.raises(ContentUnavailable) as info:
        await manager.content("alice", job.id, "spritesheet")
    assert (info.value.status, info.value.param) == (400, "variant")


async def test_the_runner_gets_the_reference_image(managers: Managers) -> None:
    runner = FakeRunner(auto=True)
    manager = await managers.start(runner)
    with_ref = await manager.create("alice", REQUEST, PNG)
    without = await manager.create("alice", REQUEST, None)
    await until(lambda: manager.active_count() == 0)
    assert runner.references == {with_ref.id: PNG, without.id: None}


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (JobFailed(500, "the denoiser died"), "generation_failed", "the denoiser died"),
        (JobFailed(504, "no result within 300s"), "deadline_exceeded", "no result within 300s"),
        (JobFailed(400, "bad", code="custom"), "custom", "bad"),
        (RuntimeError("oops"), "internal_error", "RuntimeError: oops"),
    ],
)
async def test_a_failing_runner_fails_the_job_with_its_error(
    managers: Managers, clock: Clock, error: BaseException, code: str, message: str
) -> None:
    runner = FakeRunner()
    manager = await managers.start(runner)
    job = await manager.create("alice", REQUEST, None)
    await until(lambda: job.id in runner.started)
    runner.fail(job.id, error)
    await until(lambda: manager.active_count() == 0)
    failed = await manager.get("alice", job.id)
    assert (failed.status, failed.error_code, failed.error_message) == ("failed", code, message)
    assert failed.expires_at == clock.now + RETENTION  # failed jobs are swept too
    with pytest.raises(ContentUnavailable, match=message) as info:
        await manager.content("alice", job.id)
    assert info.value.status == 409


async def test_delete_cancels_a_running_job_and_removes_it(managers: Managers) -> None:
    runner = FakeRunner()
    manager = await managers.start(runner)
    job = await manager.create("alice", REQUEST, PNG)
    await until(lambda: job.id in runner.started)
    assert await manager.delete("alice", job.id) == {
        "id": job.id,
        "object": "video.deleted",
        "deleted": True,
    }
    assert runner.cancelled == [job.id]
    assert manager.active_count() == 0
    with pytest.raises(JobNotFound):
        await manager.get("alice", job.id)
    assert await stored(manager, job.id) is None
    assert await manager._store.get_blob(job.id, "input_reference") is None
    with pytest.raises(JobNotFound):
        await manager.delete("alice", job.id)


async def test_delete_removes_a_completed_job_and_its_content(managers: Managers) -> None:
    runner = FakeRunner(auto=True)
    manager = await managers.start(runner)
    job = await manager.create("alice", KEPT, PNG)
    await until(lambda: manager.active_count() == 0)
    await manager.delete("alice", job.id)
    for name in ("video", "thumbnail", "frames", "input_reference"):
        assert await manager._store.get_blob(job.id, name) is None


async def test_owners_see_only_their_own_jobs(managers: Managers) -> None:
    runner = FakeRunner(auto=True)
    manager = await managers.start(runner)
    job = await manager.create("alice", REQUEST, None)
    await until(lambda: manager.active_count() == 0)
    for call in (
        manager.get("bob", job.id),
        manager.delete("bob", job.id),
        manager.content("bob", job.id),
    ):
        with pytest.raises(JobNotFound) as info:
            await call
        assert (info.value.status, info.value.code) == (404, "video_not_found")
    assert (await manager.list("bob"))["data"] == []
    assert [v["id"] for v in (await manager.list("alice"))["data"]] == [job.id]
    with pytest.raises(JobError) as cursor:
        await manager.list("bob", after=job.id)
    assert (cursor.value.status, cursor.value.param) == (400, "after")
    assert (await manager.get("alice", job.id)).status == "completed"  # bob deleted nothing


async def test_list_pages_with_openai_cursors(managers: Managers, clock: Clock) -> None:
    runner = FakeRunner(auto=True)
    manager = await managers.start(runner)
    ids = []
    for _ in range(5):
        ids.append((await manager.create("alice", REQUEST, None)).id)
        clock.now += 1
    await manager.create("bob", REQUEST, None)
    await until(lambda: manager.active_count() == 0)

    first = await manager.list("alice", limit=2)
    assert first["object"] == "list"
    assert [v["id"] for v in first["data"]] == ids[:-3:-1]  # newest first
    assert (first["first_id"], first["last_id"], first["has_more"]) == (ids[4], ids[3], True)
    second = await manager.list("alice", after=first["last_id"], limit=2)
    assert [v["id"] for v in second["data"]] == [ids[2], ids[1]] and second["has_more"]
    last = await manager.list("alice", after=second["last_id"], limit=2)
    assert [v["id"] for v in last["data"]] == [ids[0]] and not last["has_more"]

    asc = await manager.list("alice", limit=3, order="asc")
    assert [v["id"] for v in asc["data"]] == ids[:3] and asc["has_more"]
    rest = await manager.list("alice", after=asc["last_id"], limit=3, order="asc")
    assert [v["id"] for v in rest["data"]] == ids[3:] and not rest["has_more"]
    everything = await manager.list("alice", limit=100)
    assert len(everything["data"]) == 5 and not everything["has_more"]
    assert (await manager.list("carol")) == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


async def test_jobs_with_equal_timestamps_page_without_gaps(managers: Managers) -> None:
    runner = FakeRunner(auto=True)
    manager = await managers.start(runner)
    ids = {(await manager.create("alice", REQUEST, None)).id for _ in range(7)}  # same clock
    await until(lambda: manager.active_count() == 0)
    seen: list[str] = []
    after = None
    while True:
        page = await manager.list("alice", after=after, limit=3, order="asc")
        seen += [v["id"] for v in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert sorted(seen) == sorted(ids) and len(seen) == 7


async def test_admission_refuses_past_max_active(managers: Managers) -> None:
    runner = FakeRunner()
    manager = await managers.start(runner, max_active=2)
    await manager.create("alice", REQUEST, None)
    await manager.create("alice", REQUEST, None)
    with pytest.raises(JobsFull) as info:
        await manager.create("alice", REQUEST, None)
    assert info.value.status == 429 and info.value.retry_after_s > 0


async def test_queued_jobs_wait_for_a_running_slot(managers: Managers) -> None:
    runner = FakeRunner()
    manager = await managers.start(runner, max_running=1)
    first = await manager.create("alice", REQUEST, None)
    second = await manager.create("alice", REQUEST, None)
    await until(lambda: first.id in runner.started)
    await asyncio.sleep(0.05)
    assert (await manager.get("alice", second.id)).status == "queued"
    runner.finish(first.id)
    await until(lambda: second.id in runner.started)
    assert (await manager.get("alice", second.id)).status == "in_progress"


async def test_progress_is_persisted_throttled(managers: Managers) -> None:
    runner = FakeRunner()
    manager = await managers.start(runner, progress_every_s=0.2)
    job = await manager.create("alice", REQUEST, None)
    await until(lambda: job.id in runner.started)
    store = manager._store
    writes: list[int] = []
    update = store.update_job

    async def counting(job: Job) -> bool:
        writes.append(job.progress)
        return await update(job)

    store.update_job = counting  # type: ignore[method-assign]
    for step in range(1, 100):
        runner.progress[job.id](step / 100)
        await asyncio.sleep(0)
    runner.progress[job.id](0.995)  # no new whole percent: nothing to write
    runner.progress[job.id](0.2)  # progress never goes back

    async def latest() -> bool:
        current = await stored(manager, job.id)
        return current is not None and current.progress == 99

    await until_async(latest)
    assert len(writes) <= 3
    assert (await manager.get("alice", job.id)).progress == 99


# ------------------------------------------------------------------------ expiry


async def test_expired_jobs_are_deleted_with_their_content(
    managers: Managers, clock: Clock
) -> None:
    runner = FakeRunner()
    manager = await managers.start(runner, sweep_every_s=0.05)
    job = await manager.create("alice", KEPT, PNG)
    await until(lambda: job.id in runner.started)
    runner.finish(job.id)
    running = await manager.create("alice", REQUEST, None)  # unfinished: never expires
    await until(lambda: manager.active_count() == 1)
    clock.now += RETENTION - 1
    await asyncio.sleep(0.2)
    assert (await manager.content("alice", job.id))[1] == "video/mp4"

    clock.now += 1
    with pytest.raises(ContentUnavailable) as info:  # expired, even before the sweep
        await manager.content("alice", job.id)
    assert (info.value.status, info.value.code) == (410, "video_expired")

    async def swept() -> bool:
        # The sweep deletes the row, then the files (in a thread): wait for both.
        row_gone = await stored(manager, job.id) is None
        names = ("video", "thumbnail", "frames", "input_reference")
        blobs = [await manager._store.get_blob(job.id, name) for name in names]
        return row_gone and blobs == [None] * len(names)

    await until_async(swept)
    with pytest.raises(JobNotFound):
        await manager.get("alice", job.id)
    for name in ("video", "thumbnail", "frames", "input_reference"):
        assert await manager._store.get_blob(job.id, name) is None
    assert [v["id"] for v in (await manager.list("alice"))["data"]] == [running.id]


async def test_start_sweeps_jobs_that_expired_while_down(managers: Managers, clock: Clock) -> None:
    first = await managers.start(FakeRunner(auto=True))
    job = await first.create("alice", REQUEST, None)
    await until(lambda: first.active_count() == 0)
    await first.close()
    clock.now += RETENTION + 1
    second = await managers.start(FakeRunner())
    assert await stored(second, job.id) is None


# ------------------------------------------------------------------------ restarts


async def test_a_restarted_gateway_resumes_the_job(managers: Managers) -> None:
    runner = FakeRunner("before")
    before = await managers.start(runner)
    job = await before.create("alice", REQUEST, PNG)
    await until(lambda: job.id in runner.started)
    await before.close()
    assert runner.cancelled == [job.id]
    interrupted = await stored(before, job.id)
    assert interrupted is not None and interrupted.status == "in_progress"  # not failed

    again = FakeRunner("after")
    after = await managers.start(again)  # a new store object, as a new process opens
    await until(lambda: job.id in again.started)
    assert again.references[job.id] == PNG  # resubmitted from the stored payload
    again.finish(job.id)
    await until(lambda: after.active_count() == 0)
    done = await after.get("alice", job.id)
    assert (done.status, done.attempts) == ("completed", 2)
    assert (await after.content("alice", job.id))[0] == b"mp4:" + job.id.encode()


async def test_a_crashed_instance_resumes_its_own_jobs_at_once(managers: Managers) -> None:
    runner = FakeRunner()
    before = await managers.start(runner, instance_id="gateway-0")
    job = await before.create("alice", REQUEST, None)
    await until(lambda: job.id in runner.started)
    await before.close(release_leases=False)  # its lease is still live
    again = FakeRunner(auto=True)
    after = await managers.start(again, instance_id="gateway-0")
    await until(lambda: after.active_count() == 0)
    assert (await after.get("alice", job.id)).status == "completed"


async def run_until_started_then_restart(managers: Managers, job_id: str) -> None:
    runner = FakeRunner()
    manager = await managers.start(runner)
    await until(lambda: job_id in runner.started)
    await manager.close()


async def test_a_job_past_its_attempts_is_failed_with_the_reason(managers: Managers) -> None:
    runner = FakeRunner()
    first = await managers.start(runner)
    job = await first.create("alice", REQUEST, None)
    await until(lambda: job.id in runner.started)
    await first.close()
    for _ in range(MAX_ATTEMPTS - 1):
        await run_until_started_then_restart(managers, job.id)
    last = FakeRunner()
    manager = await managers.start(last)
    failed = await manager.get("alice", job.id)
    assert failed.status == "failed" and failed.attempts == MAX_ATTEMPTS
    assert failed.error_code == "gateway_restarted"
    assert failed.error_message == "the gateway restarted 3 times while running this job"
    await asyncio.sleep(0.1)
    assert last.started == []


async def test_a_queued_job_is_resumed_without_spending_an_attempt(managers: Managers) -> None:
    runner = FakeRunner()
    before = await managers.start(runner, max_running=1)
    busy = await before.create("alice", REQUEST, None)
    waiting = await before.create("alice", REQUEST, None)
    await until(lambda: busy.id in runner.started)
    await before.close()
    after = await managers.start(FakeRunner(auto=True))
    await until(lambda: after.active_count() == 0)
    assert (await after.get("alice", waiting.id)).attempts == 1
    assert (await after.get("alice", busy.id)).attempts == 2


# ------------------------------------------------------------------------ replicas


async def test_a_dead_replicas_job_is_taken_over_by_exactly_one_other(
    managers: Managers, clock: Clock
) -> None:
    runner_a, runner_b, runner_c = FakeRunner("a"), FakeRunner("b"), FakeRunner("c")
    a = await managers.start(runner_a)
    b = await managers.start(runner_b)
    await managers.start(runner_c)
    job = await a.create("alice", REQUEST, PNG)
    await until(lambda: job.id in runner_a.started)
    await a.close(release_leases=False)  # dies: its lease lapses only with time

    await asyncio.sleep(0.3)  # several recovery scans while the lease is live
    assert runner_b.started == runner_c.started == []

    clock.now += 10.5  # past lease_s
    await until(lambda: len(runner_b.started) + len(runner_c.started) > 0)
    await asyncio.sleep(0.3)  # more scans: nobody else takes it
    winners = [r for r in (runner_b, runner_c) if r.started]
    assert len(winners) == 1 and winners[0].started == [job.id]
    assert winners[0].references[job.id] == PNG
    winners[0].finish(job.id)

    async def done() -> bool:
        current = await stored(b, job.id)
        return current is not None and current.status == "completed"

    await until_async(done)
    assert (await b.get("alice", job.id)).attempts == 2


async def test_a_live_replica_keeps_its_jobs(managers: Managers, clock: Clock) -> None:
    runner_a, runner_b = FakeRunner("a"), FakeRunner("b")
    a = await managers.start(runner_a, lease_s=0.3)
    await managers.start(runner_b, lease_s=0.3)
    job = await a.create("alice", REQUEST, None)
    await until(lambda: job.id in runner_a.started)
    for _ in range(5):  # the clock passes many leases; a renews each time
        await asyncio.sleep(0.15)
        clock.now += 0.1
    assert runner_b.started == []
    runner_a.finish(job.id)
    await until(lambda: a.active_count() == 0)


async def test_a_job_deleted_through_another_replica_stops(managers: Managers) -> None:
    runner_a = FakeRunner("a")
    a = await managers.start(runner_a, lease_s=0.3)
    b = await managers.start(FakeRunner("b"), lease_s=0.3)
    job = await a.create("alice", REQUEST, None)
    await until(lambda: job.id in runner_a.started)
    await b.delete("alice", job.id)
    await until(lambda: runner_a.cancelled == [job.id])
    await until(lambda: a.active_count() == 0)
    assert await stored(a, job.id) is None  # not written back by the stopped run


async def test_claim_is_atomic(backend: Backend) -> None:
    store = backend.open()
    job = Job(id="video_" + uuid.uuid4().hex, owner="", request=REQUEST, created_at=1.0)
    await store.add_job(job, None, "a", 10.0)
    assert not await store.claim(job.id, "b", 20.0, 5.0)  # a's lease is live
    assert await store.claim(job.id, "a", 20.0, 5.0)  # the holder renews
    results = await asyncio.gather(*(store.claim(job.id, f"r{i}", 40.0, 25.0) for i in range(8)))
    assert results.count(True) == 1
    assert not await store.claim("video_missing", "a", 20.0, 5.0)
    await store.release(job.id, "someone-else")
    assert await store.jobs_to_recover(30.0, "x") == []  # still leased until 40
    winner = f"r{results.index(True)}"
    await store.release(job.id, winner)
    assert await store.jobs_to_recover(30.0, "x") == [job.id]


# ------------------------------------------------------------------------ the stores


async def test_update_of_a_deleted_job_writes_nothing(backend: Backend) -> None:
    store = backend.open()
    job = Job(id="video_" + uuid.uuid4().hex, owner="o", request=REQUEST, created_at=1.0)
    await store.add_job(job, PNG, "a", 10.0)
    assert await store.get_blob(job.id, "input_reference") == PNG
    job.progress = 5
    assert await store.update_job(job)
    assert (await store.get_job(job.id)) == job
    await store.delete_job(job.id)
    assert not await store.update_job(job)
    assert await store.get_job(job.id) is None
    assert await store.list_jobs("o", None, 10, "desc") == []


async def test_sqlite_keeps_one_wal_database_and_blob_files(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    job = Job(id="video_" + uuid.uuid4().hex, owner="o", request=REQUEST, created_at=1.0)
    await store.add_job(job, PNG, "a", 10.0)
    await store.put_blob(job.id, "video", b"mp4")
    assert (tmp_path / "blobs" / job.id / "video").read_bytes() == b"mp4"
    assert not [p for p in (tmp_path / "blobs" / job.id).iterdir() if p.name.startswith(".")]
    await store.close()
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_sqlite_removes_old_orphan_blob_folders(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    await store.put_blob("video_orphan", "input_reference", PNG)  # a crash before the row
    await store.put_blob("video_fresh", "input_reference", PNG)  # a create in progress
    old = time.time() - 7200
    os.utime(tmp_path / "blobs" / "video_orphan", (old, old))
    await store.remove_orphans(time.time())
    assert not (tmp_path / "blobs" / "video_orphan").exists()
    assert (tmp_path / "blobs" / "video_fresh").exists()
    await store.close()


async def test_sqlite_refuses_ids_that_are_not_names(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    with pytest.raises(ValueError, match="not a valid"):
        await store.get_blob("../etc", "passwd")
    await store.close()


async def test_redis_keys_live_under_the_prefix(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    store = RedisJobStore(redis_url, prefix=prefix)
    job = Job(id="video_" + uuid.uuid4().hex, owner="o", request=REQUEST, created_at=1.0)
    await store.add_job(job, PNG, "a", 10.0)
    await store.put_blob(job.id, "video", b"mp4")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = {str(k) for k in client.keys(prefix + "*")}  # decoded: str already
        assert keys and all(k.startswith(prefix) for k in keys)
        assert f"{prefix}job:{job.id}" in keys
        await store.delete_job(job.id)
        assert client.keys(prefix + "*") == []  # nothing left behind
    finally:
        client.close()
        await store.close()


@pytest.mark.parametrize(
    ("spec", "kind", "where"),
    [
        ("", SqliteJobStore, "DEFAULT"),
        ("  ", SqliteJobStore, "DEFAULT"),
        ("/var/lib/jobs", SqliteJobStore, "/var/lib/jobs"),
        ("relative/jobs", SqliteJobStore, "relative/jobs"),
        ("sqlite:///var/lib/jobs", SqliteJobStore, "/var/lib/jobs"),
        ("redis://localhost:6379/0", RedisJobStore, "redis://localhost:6379/0"),
        ("rediss://user:pw@host:6380/1", RedisJobStore, "rediss://user:pw@host:6380/1"),
    ],
)
async def test_open_job_store(spec: str, kind: type[JobStore], where: str) -> None:
    store = open_job_store(spec, "DEFAULT")
    try:
        assert isinstance(store, kind)
        if isinstance(store, SqliteJobStore):
            assert store.data_dir == Path(where)
        elif isinstance(store, RedisJobStore):
            assert store.url == where
    finally:
        await store.close()


@pytest.mark.parametrize("spec", ["http://host/jobs", "postgres://db", "sqlite://", "s3://b"])
def test_open_job_store_refuses_other_forms(spec: str) -> None:
    with pytest.raises(ValueError, match="redis://") as info:
        open_job_store(spec, "DEFAULT")
    assert spec in str(info.value)
