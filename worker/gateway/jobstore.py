"""Where video jobs live: the store interface and its SQLite and Redis backends.

The manager (``jobs.py``) keeps every job here so that a restarted gateway, or
another replica, can resume it. Besides records and blobs, a store offers
leases: ``claim`` is atomic, so of several replicas racing for a job whose
lease lapsed exactly one wins.

* :class:`SqliteJobStore` - one gateway (or several on one shared volume):
  ``jobs.sqlite3`` plus blob files in a data directory.
* :class:`RedisJobStore` - several gateway replicas sharing one Redis (a single
  primary; not Redis Cluster: the scripts touch keys of several hash slots).
"""

from __future__ import annotations

import abc
import asyncio
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis

from disagfusion.worker.gateway.jobs import (
    REFERENCE_BLOB,
    Job,
    UnknownCursor,
    job_from_record,
    job_to_record,
)

__all__ = ["JobStore", "RedisJobStore", "SqliteJobStore", "open_job_store"]

T = TypeVar("T")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")  # job ids and blob names become paths and keys
ORPHAN_AGE_S = 3600.0  # blob folders without a job, older than this, are leftovers


def _checked(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a valid job id or blob name: {name[:40]!r}")
    return name


def _order_is_asc(order: str) -> bool:
    if order not in ("asc", "desc"):
        raise ValueError(f"order must be 'asc' or 'desc', got {order!r}")
    return order == "asc"


class JobStore(abc.ABC):
    """Durable jobs, their blobs and their leases. Every method is async."""

    @abc.abstractmethod
    async def add_job(
        self, job: Job, reference: bytes | None, instance_id: str, lease_until: float
    ) -> None:
        """Store a new job with its reference image, leased to ``instance_id``."""

    @abc.abstractmethod
    async def update_job(self, job: Job) -> bool:
        """Overwrite a stored job's record; False (and nothing written) if it is gone."""

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> Job | None: ...

    @abc.abstractmethod
    async def list_jobs(self, owner: str, after: str | None, limit: int, order: str) -> list[Job]:
        """Up to ``limit`` of the owner's jobs by (created_at, id), ``order`` "asc" or
        "desc", after the job ``after``; raises UnknownCursor if that is not theirs."""

    @abc.abstractmethod
    async def delete_job(self, job_id: str) -> None:
        """Remove a job, its lease and its blobs (no error if it is gone)."""

    @abc.abstractmethod
    async def put_blob(self, job_id: str, name: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def get_blob(self, job_id: str, name: str) -> bytes | None: ...

    @abc.abstractmethod
    async def claim(self, job_id: str, instance_id: str, lease_until: float, now: float) -> bool:
        """Atomically lease a stored job to ``instance_id`` until ``lease_until`` if its
        lease is free, lapsed (``<= now``) or already held by that instance."""

    @abc.abstractmethod
    async def release(self, job_id: str, instance_id: str) -> None:
        """Drop the lease if ``instance_id`` holds it."""

    @abc.abstractmethod
    async def jobs_to_recover(self, now: float, instance_id: str) -> list[str]:
        """Queued or running jobs whose lease is free, lapsed, or ``instance_id``'s."""

    @abc.abstractmethod
    async def expired_jobs(self, now: float) -> list[str]:
        """Jobs whose ``expires_at`` is ``<= now``."""

    async def remove_orphans(self, now: float) -> None:  # noqa: B027 - optional hook
        """Remove blobs left behind by a crash between writes (if a backend can have them)."""

    @abc.abstractmethod
    async def close(self) -> None: ...


# ------------------------------------------------------------------------ SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    active INTEGER NOT NULL,
    expires_at REAL,
    lease_owner TEXT,
    lease_until REAL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (active);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at);
"""


class SqliteJobStore(JobStore):
    """Jobs in ``<data_dir>/jobs.sqlite3`` (WAL), blobs in ``<data_dir>/blobs/<job>/<name>``.

    Blobs are files, not BLOB columns: kept frames reach hundreds of MB, which
    would bloat the database and its WAL, and a file is freed the moment it is
    deleted. Each is written to a temporary file, fsynced and renamed into place,
    so a reader sees all of a blob or none of it.

    All SQL runs on one dedicated thread with one connection: the event loop
    never blocks, and writes land in the order they were issued (a progress
    update can never overwrite the final state written after it).
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / "jobs.sqlite3"
        self._blobs = self.data_dir / "blobs"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore-sqlite")
        self._conn: sqlite3.Connection | None = None

    # ---- plumbing ---------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self._blobs.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # an accepted job survives a power cut
        conn.executescript(_SCHEMA)
        return conn

    def _in_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = self._connect()
        with self._conn:  # one transaction: committed, or rolled back on error
            return work(self._conn)

    async def _sql(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._in_thread, work
        )

    def _blob_path(self, job_id: str, name: str) -> Path:
        return self._blobs / _checked(job_id) / _checked(name)

    def _write_file(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    @staticmethod
    def _row(job: Job) -> tuple[Any, ...]:
        return (int(job.active), job.expires_at, json.dumps(job_to_record(job)), job.id)

    # ---- JobStore -----------------------------------------------------------

    async def add_job(
        self, job: Job, reference: bytes | None, instance_id: str, lease_until: float
    ) -> None:
        if reference is not None:  # first: a stored job always has its payload
            await asyncio.to_thread(
                self._write_file, self._blob_path(job.id, REFERENCE_BLOB), reference
            )
        active, expires_at, record, job_id = self._row(job)
        await self._sql(
            lambda c: c.execute(
                "INSERT INTO jobs (id, owner, created_at, active, expires_at, lease_owner,"
                " lease_until, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, job.owner, job.created_at, active, expires_at, instance_id,
                 lease_until, record),
            )
        )  # fmt: skip

    async def update_job(self, job: Job) -> bool:
        row = self._row(job)  # serialised now: the job may change before the thread runs
        cursor = await self._sql(
            lambda c: c.execute(
                "UPDATE jobs SET active = ?, expires_at = ?, record = ? WHERE id = ?", row
            )
        )
        return cursor.rowcount == 1

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._sql(
            lambda c: c.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        )
        return None if row is None else job_from_record(json.loads(row[0]))

    async def list_jobs(self, owner: str, after: str | None, limit: int, order: str) -> list[Job]:
        asc = _order_is_asc(order)

        def query(c: sqlite3.Connection) -> list[Any]:
            where, params = "owner = ?", [owner]
            if after is not None:
                cursor_row = c.execute(
                    "SELECT created_at, id FROM jobs WHERE id = ? AND owner = ?", (after, owner)
                ).fetchone()
                if cursor_row is None:
                    raise UnknownCursor(after)
                where += f" AND (created_at, id) {'>' if asc else '<'} (?, ?)"
                params += list(cursor_row)
            direction = "ASC" if asc else "DESC"
            return c.execute(
                f"SELECT record FROM jobs WHERE {where}"
                f" ORDER BY created_at {direction}, id {direction} LIMIT ?",
                (*params, limit),
            ).fetchall()

        return [job_from_record(json.loads(row[0])) for row in await self._sql(query)]

    async def delete_job(self, job_id: str) -> None:
        await self._sql(lambda c: c.execute("DELETE FROM jobs WHERE id = ?", (job_id,)))
        # Row first: a crash in between leaves an orphan folder, which remove_orphans clears.
        folder = self._blobs / _checked(job_id)
        await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)

    async def put_blob(self, job_id: str, name: str, data: bytes) -> None:
        await asyncio.to_thread(self._write_file, self._blob_path(job_id, name), data)

    async def get_blob(self, job_id: str, name: str) -> bytes | None:
        path = self._blob_path(job_id, name)

        def read() -> bytes | None:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(read)

    async def claim(self, job_id: str, instance_id: str, lease_until: float, now: float) -> bool:
        cursor = await self._sql(
            lambda c: c.execute(
                "UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE id = ? AND"
                " (lease_owner IS NULL OR lease_owner = ? OR lease_until <= ?)",
                (instance_id, lease_until, job_id, instance_id, now),
            )
        )
        return cursor.rowcount == 1

    async def release(self, job_id: str, instance_id: str) -> None:
        await self._sql(
            lambda c: c.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL"
                " WHERE id = ? AND lease_owner = ?",
                (job_id, instance_id),
            )
        )

    async def jobs_to_recover(self, now: float, instance_id: str) -> list[str]:
        rows = await self._sql(
            lambda c: c.execute(
                "SELECT id FROM jobs WHERE active = 1 AND"
                " (lease_owner IS NULL OR lease_owner = ? OR lease_until <= ?)"
                " ORDER BY created_at",
                (instance_id, now),
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def expired_jobs(self, now: float) -> list[str]:
        rows = await self._sql(
            lambda c: c.execute(
                "SELECT id FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def remove_orphans(self, now: float) -> None:
        rows = await self._sql(lambda c: c.execute("SELECT id FROM jobs").fetchall())
        known = {row[0] for row in rows}

        def sweep() -> None:
            if not self._blobs.is_dir():
                return
            for folder in self._blobs.iterdir():
                # Age: a job being created writes its blob just before its row.
                if folder.name not in known and time.time() - folder.stat().st_mtime > ORPHAN_AGE_S:
                    shutil.rmtree(folder, ignore_errors=True)

        await asyncio.to_thread(sweep)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)


# ------------------------------------------------------------------------ Redis

# KEYS: job, active set, expiry zset. ARGV: record, id, active (1/0), expires_at ('' if none)
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[3] == '1' then redis.call('SADD', KEYS[2], ARGV[2])
else redis.call('SREM', KEYS[2], ARGV[2]) end
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
else redis.call('ZREM', KEYS[3], ARGV[2]) end
return 1
"""

# KEYS: job, lease. ARGV: instance, lease_until, now
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local holder = redis.call('HGET', KEYS[2], 'instance')
if holder and holder ~= ARGV[1] then
  local until_ = tonumber(redis.call('HGET', KEYS[2], 'until'))
  if until_ and until_ > tonumber(ARGV[3]) then return 0 end
end
redis.call('HSET', KEYS[2], 'instance', ARGV[1], 'until', ARGV[2])
return 1
"""

# KEYS: lease. ARGV: instance
_RELEASE = """
if redis.call('HGET', KEYS[1], 'instance') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: job, lease, blob-name set, active set, expiry zset.
# ARGV: id, blob key prefix, owner zset key prefix
_DELETE = """
local record = redis.call('GET', KEYS[1])
if record then
  redis.call('ZREM', ARGV[3] .. cjson.decode(record)['owner'], ARGV[1])
end
for _, name in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  redis.call('DEL', ARGV[2] .. name)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
return 0
"""


def _str(value: object) -> str:
    """A member or id as Redis returns it (bytes: this client does not decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisJobStore(JobStore):
    """Jobs in Redis under ``prefix``: ``job:<id>`` (JSON record), ``lease:<id>``
    (hash: instance, until), ``blob:<id>:<name>`` with the name set ``blobs:<id>``,
    ``owner:<owner>`` (zset by created_at), ``active`` (set), ``expiry`` (zset).

    Leases compare the caller's clock (``now``), not Redis's, so every replica
    must keep its clock in sync (NTP), as for any lease.

    Every call runs under ``asyncio.timeout(timeout_s)`` instead of redis-py's
    ``socket_timeout``: with that set, redis-py writes through ``asyncio.wait_for``,
    which on Python 3.11 can swallow a task's cancellation (a deleted job's run
    would go on).
    """

    def __init__(
        self, url: str, *, prefix: str = "disagfusion:jobs:", timeout_s: float = 10.0
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._redis = aioredis.from_url(
            url, socket_timeout=None, socket_connect_timeout=timeout_s, socket_keepalive=True
        )
        self._update = self._redis.register_script(_UPDATE)
        self._claim = self._redis.register_script(_CLAIM)
        self._release = self._redis.register_script(_RELEASE)
        self._delete = self._redis.register_script(_DELETE)

    async def _io(self, call: Awaitable[T]) -> T:
        async with asyncio.timeout(self.timeout_s):
            return await call

    def _key(self, kind: str, name: str | None = None) -> str:
        return f"{self.prefix}{kind}" if name is None else f"{self.prefix}{kind}:{name}"

    def _blob_key(self, job_id: str, name: str) -> str:
        return f"{self.prefix}blob:{job_id}:{_checked(name)}"

    async def add_job(
        self, job: Job, reference: bytes | None, instance_id: str, lease_until: float
    ) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:  # all or nothing
            pipe.set(self._key("job", job.id), json.dumps(job_to_record(job)))
            pipe.hset(
                self._key("lease", job.id),
                mapping={"instance": instance_id, "until": repr(lease_until)},
            )
            pipe.zadd(self._key("owner", job.owner), {job.id: job.created_at})
            if job.active:
                pipe.sadd(self._key("active"), job.id)
            if reference is not None:
                pipe.set(self._blob_key(job.id, REFERENCE_BLOB), reference)
                pipe.sadd(self._key("blobs", job.id), REFERENCE_BLOB)
            await self._io(pipe.execute())

    async def update_job(self, job: Job) -> bool:
        expires = "" if job.expires_at is None else repr(job.expires_at)
        written = await self._io(
            self._update(
                keys=[self._key("job", job.id), self._key("active"), self._key("expiry")],
                args=[json.dumps(job_to_record(job)), job.id, int(job.active), expires],
            )
        )
        return bool(written)

    async def get_job(self, job_id: str) -> Job | None:
        record = await self._io(self._redis.get(self._key("job", job_id)))
        return None if record is None else job_from_record(json.loads(record))

    async def list_jobs(self, owner: str, after: str | None, limit: int, order: str) -> list[Job]:
        asc = _order_is_asc(order)
        key = self._key("owner", owner)
        start = 0
        if after is not None:
            rank_of = self._redis.zrank if asc else self._redis.zrevrank
            rank = await self._io(rank_of(key, after))
            if rank is None:
                raise UnknownCursor(after)
            start = int(cast(int, rank)) + 1
        # Members with equal scores sort by id, as SQLite's (created_at, id) does.
        ids = await self._io(self._redis.zrange(key, start, start + limit - 1, desc=not asc))
        if not ids:
            return []
        records = await self._io(self._redis.mget([self._key("job", _str(i)) for i in ids]))
        return [job_from_record(json.loads(r)) for r in records if r is not None]

    async def delete_job(self, job_id: str) -> None:
        keys = [
            self._key("job", job_id),
            self._key("lease", job_id),
            self._key("blobs", job_id),
            self._key("active"),
            self._key("expiry"),
        ]
        args = [job_id, f"{self.prefix}blob:{job_id}:", self._key("owner", "")]
        await self._io(self._delete(keys=keys, args=args))

    async def put_blob(self, job_id: str, name: str, data: bytes) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(self._blob_key(job_id, name), data)
            pipe.sadd(self._key("blobs", job_id), name)
            await self._io(pipe.execute())

    async def get_blob(self, job_id: str, name: str) -> bytes | None:
        data = await self._io(self._redis.get(self._blob_key(job_id, name)))
        return None if data is None else cast(bytes, data)

    async def claim(self, job_id: str, instance_id: str, lease_until: float, now: float) -> bool:
        won = await self._io(
            self._claim(
                keys=[self._key("job", job_id), self._key("lease", job_id)],
                args=[instance_id, repr(lease_until), repr(now)],
            )
        )
        return bool(won)

    async def release(self, job_id: str, instance_id: str) -> None:
        await self._io(self._release(keys=[self._key("lease", job_id)], args=[instance_id]))

    async def jobs_to_recover(self, now: float, instance_id: str) -> list[str]:
        members = await self._io(self._redis.smembers(self._key("active")))
        ids = sorted(_str(m) for m in members)
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self._key("lease", job_id), ["instance", "until"])
            leases = await self._io(pipe.execute())
        free = []
        for job_id, (holder, until) in zip(ids, leases, strict=True):
            if holder is None or holder.decode() == instance_id or float(until or 0) <= now:
                free.append(job_id)
        return free

    async def expired_jobs(self, now: float) -> list[str]:
        ids = await self._io(self._redis.zrangebyscore(self._key("expiry"), "-inf", repr(now)))
        return [_str(i) for i in ids]

    async def close(self) -> None:
        await self._redis.aclose()


# ------------------------------------------------------------------------ choosing one

JOB_STORE_FORMS = (
    "'' (SQLite in the data dir), a directory, sqlite:///DIR, redis://..., rediss://..."
)


def open_job_store(spec: str, default_dir: str | os.PathLike[str]) -> JobStore:
    """The store a ``--job-store`` value names; ValueError for anything else."""
    spec = spec.strip()
    if not spec:
        return SqliteJobStore(default_dir)
    if spec.startswith(("redis://", "rediss://")):
        return RedisJobStore(spec)
    if spec.startswith("sqlite://"):
        path = spec.removeprefix("sqlite://")
        if not path:
            raise ValueError(
                f"--job-store {spec!r} names no directory; accepted: {JOB_STORE_FORMS}"
            )
        return SqliteJobStore(path)
    if "://" in spec:
        raise ValueError(f"--job-store {spec!r} is not supported; accepted: {JOB_STORE_FORMS}")
    return SqliteJobStore(spec)
