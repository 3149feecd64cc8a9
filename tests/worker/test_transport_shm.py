"""The `shm` transport: segments under a directory, between real processes."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.transport import open_backend
from disagfusion.worker.transport.base import DescriptorError, Peer, TransferError
from disagfusion.worker.transport.shm import (
    ShmBackend,
    data_start,
    pid_namespace,
    remove_segments_of,
    sweep_dead_segments,
)

ROOT = Path(__file__).resolve().parents[2]


def tensors() -> dict[str, torch.Tensor]:
    """The same payload in every process."""
    g = torch.Generator().manual_seed(7)
    return {
        "mask": torch.tensor([True, False, True]),  # 3 bytes: the next offset is padded
        "u8": torch.arange(5, dtype=torch.uint8),
        "latents": torch.randn(2, 3, 5, generator=g),
        "bf16": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "empty": torch.empty(0, 3),
        "ids": torch.tensor([[1, 2], [3, -4]], dtype=torch.int64),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "odd": torch.randn(1, 1001, generator=g),
        "transposed": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name
        assert got[name].is_contiguous(), name


async def no_inline() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover


def files(d: Path) -> list[str]:
    return sorted(os.listdir(d))


PEER = Peer("127.0.0.1:1", frozenset({"grpc", "shm"}))


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[ShmBackend]:
    yield ShmBackend({"dir": str(tmp_path)})


# A sender in another process: publishes, prints the metas, then follows
# commands on stdin ("release", or nothing: it waits to be killed).
SENDER = r"""
import asyncio, sys
from disagfusion.worker.transport.base import Peer
from disagfusion.worker.transport.shm import ShmBackend
from tests.worker.test_transport_shm import tensors

async def main():
    backend = ShmBackend({"dir": sys.argv[1]})
    out = await backend.publish(sys.argv[2], tensors(), Peer("127.0.0.1:1"))
    print(" ".join(m.SerializeToString().hex() for m in out.metas), flush=True)
    for line in sys.stdin:
        if line.strip() == "release":
            await out.release()
            await out.release()
            print("released", flush=True)
        elif line.strip() == "publish-and-close":
            await backend.publish("other", tensors(), Peer("127.0.0.1:1"))
            await backend.close()
            print("closed", flush=True)

asyncio.run(main())
"""


def start_sender(
    shm_dir: Path, request_id: str
) -> tuple[subprocess.Popen[str], list[pb.TensorMeta]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SENDER, str(shm_dir), request_id],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        with proc:
            proc.kill()
        pytest.fail("the sender exited before publishing")
    return proc, [pb.TensorMeta.FromString(bytes.fromhex(h)) for h in line.split()]


def command(proc: subprocess.Popen[str], cmd: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(cmd + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


async def test_round_trip_between_processes(tmp_path: Path, backend: ShmBackend) -> None:
    proc, metas = start_sender(tmp_path, "req-1")
    with proc:
        try:
            assert all(m.location == pb.SHM for m in metas)
            assert len(files(tmp_path)) == 1
            segment = json.loads(metas[0].handle)["segment"]
            assert segment.startswith(f"disagfusion.{pid_namespace()}.{proc.pid}.")
            backend.check("req-1", metas)
            got = await backend.fetch("req-1", metas, no_inline())
            assert_same(got, tensors())
            # A duplicate header before the sender released: the same bytes again.
            assert_same(await backend.fetch("req-1", metas, no_inline()), tensors())
            # Released (twice: no error): the segment stays in the sender's pool,
            # and a handle to the old publication no longer reads it.
            assert command(proc, "release") == "released"
            assert len(files(tmp_path)) == 1
            with pytest.raises(TransferError, match="released"):
                await backend.fetch("req-1", metas, no_inline())
            # close() unlinks what the sender still holds, pooled or published.
            assert command(proc, "publish-and-close") == "closed"
            assert files(tmp_path) == []
            assert proc.stdin is not None
            proc.stdin.close()
            assert proc.wait(10) == 0
        finally:
            proc.kill()


async def test_kill_9_sender_segment_swept(tmp_path: Path) -> None:
    proc, metas = start_sender(tmp_path, "req-1")
    with proc:
        assert len(files(tmp_path)) == 1
        assert sweep_dead_segments(str(tmp_path)) == 0  # its sender is alive
        proc.kill()
        proc.wait()
    assert sweep_dead_segments(str(tmp_path)) == 1
    assert files(tmp_path) == []
    with pytest.raises(TransferError):
        await ShmBackend({"dir": str(tmp_path)}).fetch("req-1", metas, no_inline())


def test_sweep_and_remove_only_touch_this_namespace(tmp_path: Path) -> None:
    ns = pid_namespace()
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # never a live pid
    names = {
        "mine_alive": f"disagfusion.{ns}.{os.getpid()}.{'a' * 16}",
        "mine_dead": f"disagfusion.{ns}.{dead}.{'b' * 16}",
        "other_ns": f"disagfusion.{ns + 1}.{dead}.{'c' * 16}",
        "unrelated": f"disagfusion.{ns}.{dead}.xyz",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert sweep_dead_segments(str(tmp_path)) == 1
    assert files(tmp_path) == sorted(v for k, v in names.items() if k != "mine_dead")
    assert remove_segments_of([os.getpid()], str(tmp_path)) == 1
    assert files(tmp_path) == sorted([names["other_ns"], names["unrelated"]])
    # A backend sweeps when it opens.
    (tmp_path / names["mine_dead"]).write_bytes(b"x")
    ShmBackend({"dir": str(tmp_path)})
    assert names["mine_dead"] not in files(tmp_path)


async def test_release_pools_the_segment_and_close_unlinks(
    tmp_path: Path, backend: ShmBackend
) -> None:
    first = await backend.publish("req-1", tensors(), PEER)
    second = await backend.publish("req-2", tensors(), PEER)
    assert len(files(tmp_path)) == 2
    await first.release()
    await first.release()
    assert len(files(tmp_path)) == 2  # kept for reuse, its pages already allocated
    with pytest.raises(TransferError):
        await backend.fetch("req-1", first.metas, no_inline())
    # The next publication reuses it; the old handles still do not read it.
    third = await backend.publish("req-3", tensors(), PEER)
    assert len(files(tmp_path)) == 2
    reused = json.loads(first.metas[0].handle)["segment"]
    assert json.loads(third.metas[0].handle)["segment"] == reused
    with pytest.raises(TransferError):
        await backend.fetch("req-1", first.metas, no_inline())
    assert_same(await backend.fetch("req-3", third.metas, no_inline()), tensors())
    await backend.close()
    assert files(tmp_path) == []
    await second.release()  # after close: nothing left, no error


async def test_in_process_round_trip_and_empty(backend: ShmBackend, tmp_path: Path) -> None:
    out = await backend.publish("r", tensors(), PEER)
    assert_same(await backend.fetch("r", out.metas, no_inline()), tensors())
    await out.release()
    empty = await backend.publish("r", {}, PEER)
    assert empty.metas == [] and len(files(tmp_path)) == 1  # the pooled segment only
    assert await backend.fetch("r", [], no_inline()) == {}
    await backend.close()
    assert files(tmp_path) == []


def forge(meta: pb.TensorMeta, **changes: object) -> pb.TensorMeta:
    handle = json.loads(meta.handle)
    handle.update(changes)
    forged = pb.TensorMeta()
    forged.CopyFrom(meta)
    forged.handle = json.dumps(handle).encode()
    return forged


def with_handle(meta: pb.TensorMeta, handle: bytes) -> pb.TensorMeta:
    forged = pb.TensorMeta()
    forged.CopyFrom(meta)
    forged.handle = handle
    return forged


async def test_forged_descriptors_rejected_before_reading(
    backend: ShmBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = await backend.publish("req-1", tensors(), PEER)
    metas = list(out.metas)
    segment = json.loads(metas[0].handle)["segment"]
    start = data_start("req-1")
    first, second = metas[2], metas[3]  # latents, bf16: both non-empty
    other = segment[:-16] + ("0" * 16 if not segment.endswith("0" * 16) else "1" * 16)
    cases: dict[str, list[pb.TensorMeta]] = {
        "not JSON": [with_handle(first, b"{nope")],
        "not UTF-8": [with_handle(first, b"\xff\xfe")],
        "JSON list": [with_handle(first, b"[1, 2]")],
        "extra key": [forge(first, path="/etc/passwd")],
        "no handle": [with_handle(first, b"")],
        "bad name": [forge(first, segment="other.1.2.0123456789abcdef")],
        "traversal": [forge(first, segment="../../etc/passwd")],
        "slash": [forge(first, segment=f"x/{segment}")],
        "trailing newline": [forge(first, segment=segment + "\n")],
        "string offset": [forge(first, offset=str(start))],
        "bool nbytes": [forge(metas[0], nbytes=True)],
        "float offset": [forge(first, offset=float(start))],
        "negative offset": [forge(first, offset=-64)],
        "inside header": [forge(first, offset=0)],
        "unaligned": [forge(first, offset=start + 8)],
        "nbytes mismatch": [forge(first, nbytes=first.nbytes + 4)],
        "overlap": [forge(first, offset=start), forge(second, offset=start)],
        "far offset": [forge(first, offset=start + (1 << 40))],
        "two segments": [first, forge(second, segment=other)],
        "not shm": [
            pb.TensorMeta(
                name="x",
                shape=[1],
                dtype="uint8",
                nbytes=1,
                location=pb.INLINE,
                handle=metas[1].handle,
            )
        ],
        "repeated name": [first, forge(first, offset=start + 64 * -(-first.nbytes // 64))],
        "huge handle": [with_handle(first, b" " * (65 << 10))],
    }

    def no_open(*args: object, **kwargs: object) -> int:
        raise AssertionError("a forged descriptor opened a file")

    with monkeypatch.context() as m:
        m.setattr(os, "open", no_open)
        for why, forged in cases.items():
            with pytest.raises(DescriptorError):
                backend.check("req-1", forged)
                pytest.fail(f"check accepted: {why}")
            with pytest.raises(DescriptorError):
                await backend.fetch("req-1", forged, no_inline())
                pytest.fail(f"fetch accepted: {why}")
    assert files(tmp_path) == [segment]
    # The real descriptors still fetch.
    assert_same(await backend.fetch("req-1", metas, no_inline()), tensors())
    await out.release()


async def test_segment_of_another_request_is_left_alone(
    backend: ShmBackend, tmp_path: Path
) -> None:
    out = await backend.publish("req-a", tensors(), PEER)
    segment = json.loads(out.metas[0].handle)["segment"]
    backend.check("req-b", out.metas)  # looks fine until the segment is read
    with pytest.raises(DescriptorError, match="another request"):
        await backend.fetch("req-b", out.metas, no_inline())
    assert files(tmp_path) == [segment]
    assert_same(await backend.fetch("req-a", out.metas, no_inline()), tensors())
    await out.release()


async def test_short_or_foreign_file_rejected(backend: ShmBackend, tmp_path: Path) -> None:
    out = await backend.publish("req-1", tensors(), PEER)
    segment = json.loads(out.metas[0].handle)["segment"]
    path = tmp_path / segment
    good = path.read_bytes()
    path.write_bytes(good[: data_start("req-1") + 8])  # truncated
    with pytest.raises(DescriptorError, match="bytes"):
        await backend.fetch("req-1", out.metas, no_inline())
    path.write_bytes(b"NOTMAGIC" + good[8:])  # same size, not ours
    with pytest.raises(DescriptorError, match="not a disagfusion"):
        await backend.fetch("req-1", out.metas, no_inline())
    assert path.exists()
    await out.release()
    await backend.close()
    assert files(tmp_path) == []


async def test_large_payload_copied_in_a_thread(backend: ShmBackend, tmp_path: Path) -> None:
    big = {"x": torch.randn(1 << 19), "y": torch.arange(3, dtype=torch.int64)}  # 2 MiB
    out = await backend.publish("big", big, PEER)
    assert_same(await backend.fetch("big", out.metas, no_inline()), big)
    await out.release()
    await backend.close()
    assert files(tmp_path) == []


def test_reaches_and_options(tmp_path: Path, backend: ShmBackend) -> None:
    here = backend.endpoint()
    assert here and here == ShmBackend({"dir": str(tmp_path)}).endpoint()
    assert backend.reaches(Peer("a:1", frozenset({"grpc", "shm"}), {"shm": here}))
    assert not backend.reaches(Peer("a:1", frozenset({"grpc", "shm"}), {"shm": "other:1:2"}))
    assert not backend.reaches(Peer("a:1", frozenset({"grpc", "shm"})))
    assert not backend.reaches(Peer("a:1", frozenset({"grpc"}), {"shm": here}))
    opened = open_backend("shm", {"dir": str(tmp_path)})
    assert isinstance(opened, ShmBackend) and opened.location == pb.SHM and not opened.pushes
    with pytest.raises(ValueError, match="no option"):
        ShmBackend({"size": "1"})
    with pytest.raises(ValueError, match="not a directory"):
        ShmBackend({"dir": str(tmp_path / "missing")})


async def test_full_shm_is_a_transfer_error(
    backend: ShmBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(TransferError, match="No space"):
        await backend.publish("req-1", tensors(), PEER)
    assert files(tmp_path) == []
    await backend.close()
