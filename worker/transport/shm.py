"""`shm`: tensor bytes in a POSIX shared memory segment, for a receiver on the
same host (`serve --local`, or stages in one pod).

The sender copies one payload into one segment, a file under /dev/shm that
it creates itself (not `multiprocessing.shared_memory`, whose resource
tracker unlinks segments a second time and warns) and keeps mapped: a header
(magic, the data length, a random publication token, the request id) and
then each tensor's bytes at a 64-byte aligned offset. Each tensor's handle is
compact JSON, `{"segment": NAME, "offset": O, "nbytes": N, "token": HEX}`.
The receiver checks the handles without touching any file, then checks that
the segment holds that token and request, copies the bytes into its own
(reused) buffers and checks the token again.

When the attempt ends the sender invalidates the token and keeps the segment
for its next hand-off: fresh shared memory costs page faults that cost as
much as the copy (about 25 ms per 64 MiB on the build machine). Free segments
are unlinked after POOL_IDLE_S unused, beyond POOL_BYTES, and at close; space
is allocated up front (posix_fallocate), so a full /dev/shm is an ENOSPC (a
TransferError, and grpc for that attempt) rather than a SIGBUS.

A segment's name says which process made it,
`disagfusion.<pid namespace inode>.<pid>.<16 hex digits>`, so the segments
of a sender that died (kill -9) are removed by `sweep_dead_segments` (run
when a backend opens and every 10 s by publish), or by a launcher with
`remove_segments_of` once its children have exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import mmap
import os
import re
import secrets
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.transport.base import (
    MAX_HANDLE_BYTES,
    Backend,
    DescriptorError,
    Outgoing,
    Peer,
    TransferError,
    check_meta_sizes,
    empty_like_meta,
    flat_bytes,
    inline_option,
    meta_for,
)

SHM_DIR = "/dev/shm"
MAGIC = b"DFSHM\x00\x02\x00"
# magic, data length (u64), publication token (16 bytes), request id length (u32);
# the request id follows.
_HEADER = struct.Struct("<8sQ16sI")
_TOKEN_AT = 16  # the token's offset in the header
_NO_TOKEN = bytes(16)
# Free segments a sender keeps for reuse (their pages stay allocated and mapped),
# at most this many bytes, each unlinked after this long unused.
POOL_BYTES = 512 << 20
POOL_IDLE_S = 30.0
SEGMENT_GRANULE = 1 << 20  # segment sizes are multiples of this, so they fit again
MAPPINGS_KEPT = 32  # receiving side: senders' segments kept mapped
ALIGN = 64
# The most tensor bytes one segment holds (the payload limit of runtime/payload.py).
MAX_SEGMENT_DATA = 4 << 30
# Payloads at least this large are copied in a thread, off the event loop.
THREAD_BYTES = 1 << 20
SWEEP_INTERVAL_S = 10.0

SEGMENT_RE = re.compile(r"disagfusion\.([0-9]{1,20})\.([0-9]{1,10})\.[0-9a-f]{16}")
_TOKEN_RE = re.compile(r"[0-9a-f]{32}")

_T = TypeVar("_T")


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def data_start(request_id: str) -> int:
    """Where the first tensor of `request_id`'s segment begins."""
    return _align(_HEADER.size + len(request_id.encode()))


def _ns_inode(kind: str) -> int:
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return 0


def pid_namespace() -> int:
    """This process's pid namespace (its inode; 0 when /proc cannot say)."""
    return _ns_inode("pid")


def host_identity(shm_dir: str = SHM_DIR) -> str:
    """The same string in every process that sees the same segments: this
    boot, this IPC namespace and the filesystem `shm_dir` is on."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    try:
        dev = os.stat(shm_dir).st_dev
    except OSError:
        dev = 0
    return f"{boot or socket.gethostname()}:{_ns_inode('ipc')}:{dev}"


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _own_segments(shm_dir: str) -> Iterable[tuple[str, int]]:
    """(name, pid) of the segments in `shm_dir` made in this pid namespace."""
    ns = str(pid_namespace())
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return
    for name in names:
        m = SEGMENT_RE.fullmatch(name)
        if m is not None and m.group(1) == ns:
            yield name, int(m.group(2))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or a pid we cannot judge
    return True


def sweep_dead_segments(shm_dir: str = SHM_DIR) -> int:
    """Unlink the segments left by processes of this pid namespace that are
    gone (a sender killed before it released); returns how many."""
    removed = 0
    for name, pid in _own_segments(shm_dir):
        if pid > 0 and not _alive(pid):
            removed += _unlink(os.path.join(shm_dir, name))
    return removed


def remove_segments_of(pids: Iterable[int], shm_dir: str = SHM_DIR) -> int:
    """Unlink the segments made by `pids` (children of this pid namespace that
    have exited: a launcher calls it after reaping them); returns how many."""
    wanted = set(pids)
    removed = 0
    for name, pid in _own_segments(shm_dir):
        if pid in wanted:
            removed += _unlink(os.path.join(shm_dir, name))
    return removed


@dataclass(frozen=True)
class _Layout:
    segment: str
    token: bytes  # the publication's: the segment holds this request while it matches
    offsets: list[int]  # one per meta, in order
    end: int  # the last byte any tensor needs, exclusive


def _parse_handle(meta: pb.TensorMeta) -> tuple[str, int, int, bytes]:
    if meta.location != pb.SHM:
        raise DescriptorError(f"tensor {meta.name!r} is not in shared memory")
    if not meta.handle:
        raise DescriptorError(f"tensor {meta.name!r} has no shm handle")
    if len(meta.handle) > MAX_HANDLE_BYTES:
        raise DescriptorError(f"tensor {meta.name!r}: shm handle of {len(meta.handle)} bytes")
    try:
        handle = json.loads(meta.handle)
    except (UnicodeDecodeError, ValueError):
        raise DescriptorError(f"tensor {meta.name!r}: shm handle is not JSON") from None
    if not isinstance(handle, dict) or set(handle) != {"segment", "offset", "nbytes", "token"}:
        raise DescriptorError(
            f"tensor {meta.name!r}: shm handle must have exactly segment, offset, nbytes and token"
        )
    segment, offset, nbytes = handle["segment"], handle["offset"], handle["nbytes"]
    if not isinstance(segment, str) or SEGMENT_RE.fullmatch(segment) is None:
        raise DescriptorError(f"tensor {meta.name!r}: {segment!r} is not a segment name")
    token = handle["token"]
    if not isinstance(token, str) or _TOKEN_RE.fullmatch(token) is None:
        raise DescriptorError(f"tensor {meta.name!r}: shm token {token!r} is malformed")
    for key, value in (("offset", offset), ("nbytes", nbytes)):
        if type(value) is not int or value < 0:
            raise DescriptorError(f"tensor {meta.name!r}: shm {key} {value!r} is not a size")
    return segment, offset, nbytes, bytes.fromhex(token)


def _layout(request_id: str, metas: Sequence[pb.TensorMeta]) -> _Layout | None:
    """The checked layout of `metas`' segment (None for no tensors)."""
    if not metas:
        return None
    check_meta_sizes(metas)
    names = [m.name for m in metas]
    if len(set(names)) != len(names):
        raise DescriptorError("tensor names repeat")
    start = data_start(request_id)
    segments: set[tuple[str, bytes]] = set()
    offsets: list[int] = []
    spans: list[tuple[int, int]] = []
    for meta in metas:
        segment, offset, nbytes, token = _parse_handle(meta)
        segments.add((segment, token))
        if len(segments) > 1:
            raise DescriptorError("the tensors name several segments or publications")
        if offset < start or offset % ALIGN:
            raise DescriptorError(
                f"tensor {meta.name!r}: offset {offset} is not a {ALIGN}-byte aligned"
                f" offset past the {start}-byte header"
            )
        if nbytes != meta.nbytes:
            raise DescriptorError(
                f"tensor {meta.name!r}: handle says {nbytes} bytes, the header {meta.nbytes}"
            )
        offsets.append(offset)
        spans.append((offset, offset + nbytes))
    total = sum(m.nbytes for m in metas)
    if total > MAX_SEGMENT_DATA:
        raise DescriptorError(f"{total} bytes of tensors exceed {MAX_SEGMENT_DATA}")
    previous_end = 0
    for offset, end in sorted(spans):
        if offset < previous_end:
            raise DescriptorError(f"tensors overlap at offset {offset}")
        previous_end = end
    end = max(e for _, e in spans)
    # Laid out back to back, the tensors end here at the latest: no gaps are sent.
    bound = start + sum(_align(m.nbytes) for m in metas)
    if end > bound:
        raise DescriptorError(f"tensors end at {end}, past the {bound} bytes they need")
    segment, token = segments.pop()
    return _Layout(segment, token, offsets, end)


def _close_mapping(mapping: mmap.mmap) -> None:
    # A fetch in another thread may still copy from it: then its last view closes it.
    with contextlib.suppress(BufferError):
        mapping.close()


async def _maybe_in_thread(nbytes: int, fn: Callable[[], _T]) -> _T:
    if nbytes >= THREAD_BYTES:
        return await asyncio.to_thread(fn)
    return fn()


@dataclass(eq=False)
class _Segment:
    """One segment file of this sender, mapped for writing."""

    name: str
    path: str
    size: int
    mapping: mmap.mmap
    idle_since: float = 0.0

    def drop(self) -> None:
        _unlink(self.path)
        self.mapping.close()


class ShmBackend(Backend):
    name = "shm"
    location = pb.SHM
    pushes = False
    default_inline_below = 256 << 10
    option_help = {
        **inline_option(256 << 10),
        "dir": f"where segments are created (default {SHM_DIR}; the same in every stage)",
    }

    def __init__(self, options: Mapping[str, str] | None = None, device: str = "cpu") -> None:
        super().__init__(options, device)
        self.dir = self.options.get("dir", SHM_DIR)
        if not os.path.isdir(self.dir):
            raise ValueError(f"transport option dir: {self.dir!r} is not a directory")
        self._endpoint = host_identity(self.dir)
        self._pidns = pid_namespace()
        self._busy: dict[str, _Segment] = {}  # published, not yet released
        self._free: list[_Segment] = []  # released, kept for reuse
        self._last_sweep = time.monotonic()
        # Receiving side: mappings of senders' segments, most recently used last.
        self._maps: OrderedDict[tuple[str, int], mmap.mmap] = OrderedDict()
        self._maps_lock = threading.Lock()
        sweep_dead_segments(self.dir)

    def endpoint(self) -> str:
        return self._endpoint

    def reaches(self, peer: Peer) -> bool:
        return self.name in peer.accepts and peer.endpoint(self.name) == self._endpoint

    def _path(self, segment: str) -> str:
        return os.path.join(self.dir, segment)

    @property
    def _outstanding(self) -> set[str]:
        """Every segment file this backend holds (published or pooled)."""
        return set(self._busy) | {seg.name for seg in self._free}

    def _sweep_now_and_then(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep >= SWEEP_INTERVAL_S:
            self._last_sweep = now
            sweep_dead_segments(self.dir)
            for seg in [seg for seg in self._free if now - seg.idle_since > POOL_IDLE_S]:
                self._free.remove(seg)
                seg.drop()

    def _take(self, end: int) -> _Segment:
        """A free segment that fits `end` bytes (not more than twice), or a new one."""
        fits = [seg for seg in self._free if end <= seg.size <= 2 * max(end, SEGMENT_GRANULE)]
        if fits:
            seg = min(fits, key=lambda seg: seg.size)
            self._free.remove(seg)
            return seg
        name = f"disagfusion.{self._pidns}.{os.getpid()}.{secrets.token_hex(8)}"
        path = self._path(name)
        size = -(-end // SEGMENT_GRANULE) * SEGMENT_GRANULE
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            try:
                # Allocate now: a full /dev/shm is an ENOSPC here, not a SIGBUS at a write.
                os.posix_fallocate(fd, 0, size)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, size)  # a filesystem without fallocate (tests' dirs)
            mapping = mmap.mmap(fd, size)
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)
        return _Segment(name, path, size, mapping)

    def _give_back(self, seg: _Segment) -> None:
        seg.mapping[_TOKEN_AT : _TOKEN_AT + len(_NO_TOKEN)] = _NO_TOKEN  # stale handles fail
        seg.idle_since = time.monotonic()
        self._free.append(seg)
        pooled = sum(s.size for s in self._free)
        while pooled > POOL_BYTES and self._free:
            oldest = min(self._free, key=lambda s: s.idle_since)
            self._free.remove(oldest)
            pooled -= oldest.size
            oldest.drop()

    async def publish(
        self, request_id: str, tensors: Mapping[str, torch.Tensor], peer: Peer
    ) -> Outgoing:
        self._sweep_now_and_then()
        if not tensors:
            return Outgoing([])
        start = data_start(request_id)
        offsets: list[int] = []
        end = start
        for t in tensors.values():
            offsets.append(end)
            end += _align(t.numel() * t.element_size())
        data_len = end - start
        if data_len > MAX_SEGMENT_DATA:
            raise ValueError(f"a payload of {data_len} bytes exceeds {MAX_SEGMENT_DATA}")
        try:
            seg = self._take(end)
        except OSError as err:
            raise TransferError(f"cannot make an shm segment in {self.dir}: {err}") from err
        token = secrets.token_bytes(16)
        metas = [
            meta_for(
                name,
                t,
                pb.SHM,
                json.dumps(
                    {
                        "segment": seg.name,
                        "offset": offset,
                        "nbytes": t.numel() * t.element_size(),
                        "token": token.hex(),
                    },
                    separators=(",", ":"),
                ).encode(),
            )
            for (name, t), offset in zip(tensors.items(), offsets, strict=True)
        ]
        rid = request_id.encode()
        header = _HEADER.pack(MAGIC, data_len, token, len(rid)) + rid
        values = list(tensors.values())

        def write() -> None:
            mapping = seg.mapping
            mapping[_TOKEN_AT : _TOKEN_AT + len(_NO_TOKEN)] = _NO_TOKEN
            for t, offset in zip(values, offsets, strict=True):
                src = flat_bytes(t)
                if src.numel():
                    dst = torch.frombuffer(
                        mapping, dtype=torch.uint8, count=src.numel(), offset=offset
                    )
                    dst.copy_(src)  # torch's threads share the copy
                    del dst
            mapping[: len(header)] = header  # the token last: now the handles are valid

        self._busy[seg.name] = seg
        try:
            await _maybe_in_thread(data_len, write)
        except BaseException:
            self._busy.pop(seg.name, None)
            seg.drop()
            raise

        async def release() -> None:
            if self._busy.pop(seg.name, None) is seg:
                self._give_back(seg)

        return Outgoing(metas, release=release)

    def check(self, request_id: str, metas: Sequence[pb.TensorMeta]) -> None:
        _layout(request_id, metas)

    async def fetch(
        self,
        request_id: str,
        metas: Sequence[pb.TensorMeta],
        inline: AsyncIterator[bytes],
    ) -> dict[str, torch.Tensor]:
        layout = _layout(request_id, metas)
        if layout is None:
            return {}
        path = self._path(layout.segment)
        metas = list(metas)

        def read() -> dict[str, torch.Tensor]:
            try:
                # Read-write only so that torch can view the mapping; nothing writes to it.
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                raise TransferError(
                    f"shm segment {layout.segment} is gone (its sender died or released it)"
                ) from None
            except OSError as err:
                raise TransferError(f"cannot open shm segment {layout.segment}: {err}") from err
            try:
                st = os.fstat(fd)
                self._verify(fd, st, request_id, layout)
                mapping = self._mapping(fd, st, layout)
            finally:
                os.close(fd)
            out = {
                m.name: self._copy_out(mapping, m, o)
                for m, o in zip(metas, layout.offsets, strict=True)
            }
            # The sender reuses a segment only after invalidating its token: a
            # token still in place after the copy means the bytes were this request's.
            if mapping[_TOKEN_AT : _TOKEN_AT + 16] != layout.token:
                raise TransferError(f"shm segment {layout.segment} was released meanwhile")
            return out

        return await _maybe_in_thread(sum(m.nbytes for m in metas), read)

    @staticmethod
    def _verify(fd: int, st: os.stat_result, request_id: str, layout: _Layout) -> None:
        """The segment holds `request_id`'s publication, and is large enough."""
        name = layout.segment
        if not stat.S_ISREG(st.st_mode):
            raise DescriptorError(f"shm segment {name} is not a regular file")
        if st.st_size < layout.end:
            raise DescriptorError(f"shm segment {name} has {st.st_size} of {layout.end} bytes")
        rid = request_id.encode()
        head = os.pread(fd, _HEADER.size + len(rid), 0)
        if len(head) < _HEADER.size + len(rid):
            raise DescriptorError(f"shm segment {name} is shorter than its header")
        magic, data_len, token, rid_len = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise DescriptorError(f"{name} is not a disagfusion shm segment")
        if token != layout.token:
            if token == _NO_TOKEN:
                raise TransferError(f"shm segment {name} was released by its sender")
            # Released and reused for another hand-off: the sender publishes again.
            raise TransferError(f"shm segment {name} no longer holds that publication")
        if rid_len != len(rid) or head[_HEADER.size :] != rid:
            raise DescriptorError(f"shm segment {name} belongs to another request")
        if data_start(request_id) + data_len < layout.end:
            raise DescriptorError(f"shm segment {name} holds fewer bytes than described")

    def _mapping(self, fd: int, st: os.stat_result, layout: _Layout) -> mmap.mmap:
        """A mapping of the segment, kept while its sender reuses it: mapping (and
        populating) 64 MiB anew costs a few ms per hand-off."""
        key = (layout.segment, st.st_ino)
        with self._maps_lock:
            self._unmap_gone()
            mapping = self._maps.pop(key, None)
            if mapping is not None and len(mapping) >= layout.end:
                self._maps[key] = mapping  # most recently used last
                return mapping
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapping = mmap.mmap(fd, st.st_size, flags=flags)
            self._maps[key] = mapping
            while len(self._maps) > MAPPINGS_KEPT:
                _close_mapping(self._maps.pop(next(iter(self._maps))))
            return mapping

    def _unmap_gone(self) -> None:
        """Close mappings of segments their sender has unlinked (their memory is
        only freed once nobody maps them)."""
        for name, inode in list(self._maps):
            try:
                alive = os.stat(self._path(name)).st_ino == inode
            except OSError:
                alive = False
            if not alive:
                _close_mapping(self._maps.pop((name, inode)))

    def _copy_out(self, mapping: mmap.mmap, meta: pb.TensorMeta, offset: int) -> torch.Tensor:
        t = empty_like_meta(meta, "cpu")  # a reused, already mapped buffer when large
        if meta.nbytes:
            src = torch.frombuffer(mapping, dtype=torch.uint8, count=meta.nbytes, offset=offset)
            t.reshape(-1).view(torch.uint8).copy_(src)  # torch's threads share the copy
            del src  # the mapping may be closed only without views
        return t if torch.device(self.device).type == "cpu" else t.to(self.device)

    async def close(self) -> None:
        for seg in [*self._busy.values(), *self._free]:
            seg.drop()
        self._busy.clear()
        self._free.clear()
        with self._maps_lock:
            for mapping in self._maps.values():
                _close_mapping(mapping)
            self._maps.clear()
