"""The `nixl` transport: a sender in another process (multiprocessing "spawn",
metas passed through a Pipe), the receiver here, host memory (DRAM) over UCX,
with `UCX_TLS=tcp` and with UCX's own choice (shared memory on one host)."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

# Not imported here: NIXL's native libraries, loaded into the pytest process at
# collection, crash grpc_tools' protoc in a later test (tests/test_proto.py).
if importlib.util.find_spec("nixl_cu12") is None:
    pytest.skip("NIXL is not installed (pip install nixl-cu12)", allow_module_level=True)

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.transport import open_backend
from disagfusion.worker.transport.base import (
    DescriptorError,
    Peer,
    TransferError,
)
from disagfusion.worker.transport.nixl import NixlBackend

PEER = Peer("127.0.0.1:1", frozenset({"grpc", "nixl"}))
# UCX over TCP, and UCX's own choice (shared memory, CMA, between processes on a host).
VARIANTS: dict[str, dict[str, str]] = {"tcp": {"ucx_tls": "tcp"}, "default": {}}


def payload(kind: str) -> dict[str, torch.Tensor]:
    """The same tensors in every process."""
    g = torch.Generator().manual_seed(11)
    if kind == "big":
        return {"latents": torch.randn(16 << 20, generator=g)}  # 64 MiB
    if kind == "empty":
        return {"none": torch.empty(0, 4), "zero": torch.empty(0, dtype=torch.uint8)}
    return {
        "latents": torch.randn(2, 4, 8, 8, generator=g),
        "bf16": torch.randn(3, 77, generator=g).to(torch.bfloat16),
        "u8": torch.arange(251, dtype=torch.uint8),
        "empty": torch.empty(0, 3),
        "mask": torch.tensor([True, False, True]),
        "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


async def no_inline() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover


def _sender_main(conn: Connection) -> None:
    """The sending process: one backend per variant (UCX_TLS is per agent);
    publishes and releases on command, answering with the serialized metas."""

    async def main() -> None:
        backends = {v: NixlBackend(options) for v, options in VARIANTS.items()}
        published: dict[tuple[str, str], Any] = {}
        conn.send(("ready", os.getpid()))
        while True:
            command = await asyncio.to_thread(conn.recv)
            if command[0] == "quit":
                break
            try:
                if command[0] == "publish":
                    _, variant, rid, kind = command
                    out = await backends[variant].publish(rid, payload(kind), PEER)
                    published[variant, rid] = out
                    conn.send([m.SerializeToString() for m in out.metas])
                else:
                    _, variant, rid = command
                    await published.pop((variant, rid)).release()
                    conn.send("released")
            except Exception as err:
                conn.send(("error", repr(err)))
        for backend in backends.values():
            await backend.close()
        conn.send("closed")

    asyncio.run(main())


class Sender:
    """A sender process; `variant` picks its tcp or default agent."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_sender_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        assert self._recv(60)[0] == "ready"

    def _recv(self, timeout: float = 20) -> Any:
        assert self.conn.poll(timeout), "the sender process did not answer"
        return self.conn.recv()

    def publish(self, variant: str, rid: str, kind: str = "mixed") -> list[pb.TensorMeta]:
        self.conn.send(("publish", variant, rid, kind))
        answer = self._recv()
        assert answer[0] != "error", answer
        return [pb.TensorMeta.FromString(raw) for raw in answer]

    def release(self, variant: str, rid: str) -> None:
        self.conn.send(("release", variant, rid))
        assert self._recv() == "released"

    def signal(self, sig: int) -> None:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, sig)

    def close(self) -> None:
        if self.proc.is_alive():
            self.signal(signal.SIGCONT)
            try:
                self.conn.send(("quit",))
                self._recv()
            except (OSError, EOFError, AssertionError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():  # pragma: no cover
            self.proc.kill()
            self.proc.join()
        self.conn.close()


@pytest.fixture(scope="module")
def sender() -> Iterator[Sender]:
    s = Sender()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def receiver(variant: str) -> AsyncIterator[NixlBackend]:
    backend = NixlBackend({**VARIANTS[variant], "timeout_s": "10"})
    try:
        yield backend
    finally:
        await backend.close()


# ---- between processes -------------------------------------------------------


async def test_round_trip(sender: Sender, variant: str, receiver: NixlBackend) -> None:
    metas = sender.publish(variant, "req-1")
    assert all(m.location == pb.NIXL for m in metas)
    receiver.check("req-1", metas)
    assert_same(await receiver.fetch("req-1", metas, no_inline()), payload("mixed"))
    # Fetched twice (a receiver retrying): the same bytes, the agent reused.
    assert_same(await receiver.fetch("req-1", metas, no_inline()), payload("mixed"))
    sender.release(variant, "req-1")


async def test_64_mib(sender: Sender, variant: str, receiver: NixlBackend) -> None:
    metas = sender.publish(variant, "req-big", "big")
    want = payload("big")
    times = []
    for _ in range(3):
        started = time.perf_counter()
        got = await receiver.fetch("req-big", metas, no_inline())
        times.append(time.perf_counter() - started)
        assert_same(got, want)
    sender.release(variant, "req-big")
    best = min(times)
    rate = (64 << 20) / best / 1e9
    print(f"nixl {variant}: 64 MiB in {best * 1e3:.0f} ms ({rate:.2f} GB/s), fresh buffers")


async def test_only_empty_tensors(sender: Sender, variant: str, receiver: NixlBackend) -> None:
    metas = sender.publish(variant, "req-empty", "empty")
    assert_same(await receiver.fetch("req-empty", metas, no_inline()), payload("empty"))
    sender.release(variant, "req-empty")


async def test_fetch_after_release_fails(
    sender: Sender, variant: str, receiver: NixlBackend
) -> None:
    metas = sender.publish(variant, "req-2")
    assert_same(await receiver.fetch("req-2", metas, no_inline()), payload("mixed"))
    sender.release(variant, "req-2")
    started = time.monotonic()
    with pytest.raises((TransferError, DescriptorError)):
        await receiver.fetch("req-2", metas, no_inline())
    assert time.monotonic() - started < 5  # the guard says so, no timeout needed
    # A handle released before it was ever fetched fails the same way.
    metas = sender.publish(variant, "req-3")
    sender.release(variant, "req-3")
    with pytest.raises((TransferError, DescriptorError)):
        await receiver.fetch("req-3", metas, no_inline())


@pytest.mark.slow
async def test_stopped_then_killed_sender() -> None:
    """A frozen sender is a timeout over TCP (where the sender answers reads
    itself); a killed one a TransferError at once, on every transport."""
    proc = Sender()
    tcp = NixlBackend({**VARIANTS["tcp"], "timeout_s": "1"})
    default = NixlBackend({**VARIANTS["default"], "timeout_s": "5"})
    try:
        tcp_metas = proc.publish("tcp", "req-s")
        default_metas = proc.publish("default", "req-s")
        proc.signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(TransferError, match="took more than"):
            await tcp.fetch("req-s", tcp_metas, no_inline())
        assert time.monotonic() - started < 3
        proc.signal(signal.SIGCONT)
        # The agent was dropped after the timeout; the sender answers again.
        assert_same(await tcp.fetch("req-s", tcp_metas, no_inline()), payload("mixed"))
        proc.signal(signal.SIGKILL)
        proc.proc.join(10)
        for backend, metas in ((tcp, tcp_metas), (default, default_metas)):
            started = time.monotonic()
            with pytest.raises(TransferError):
                await backend.fetch("req-s", metas, no_inline())
            assert time.monotonic() - started < 5
    finally:
        await tcp.close()
        await default.close()
        proc.close()


# ---- in one process: handles and options ----------------------------------------


@pytest.fixture
async def pair() -> AsyncIterator[tuple[NixlBackend, NixlBackend]]:
    a = NixlBackend({"ucx_tls": "tcp", "timeout_s": "5"})
    b = NixlBackend({"ucx_tls": "tcp", "timeout_s": "5"})
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def edit(meta: pb.TensorMeta, **fields: Any) -> pb.TensorMeta:
    doc = json.loads(meta.handle)
    doc.update(fields)
    out = pb.TensorMeta()
    out.CopyFrom(meta)
    out.handle = json.dumps(doc).encode()
    return out


async def test_in_process_and_loopback(pair: tuple[NixlBackend, NixlBackend]) -> None:
    a, b = pair
    out = await a.publish("r", payload("mixed"), PEER)
    assert_same(await b.fetch("r", out.metas, no_inline()), payload("mixed"))
    assert_same(await a.fetch("r", out.metas, no_inline()), payload("mixed"))  # loopback
    await out.release()
    await out.release()  # idempotent
    with pytest.raises(TransferError):
        await b.fetch("r", out.metas, no_inline())


async def test_forged_handles_are_descriptor_errors(
    pair: tuple[NixlBackend, NixlBackend],
) -> None:
    a, b = pair
    out = await a.publish("r", payload("mixed"), PEER)
    first = out.metas[0]
    doc = json.loads(first.handle)

    def raw(handle: bytes) -> pb.TensorMeta:
        m = pb.TensorMeta()
        m.CopyFrom(first)
        m.handle = handle
        return m

    other = NixlBackend({"ucx_tls": "tcp"})
    other_out = await other.publish("r", payload("mixed"), PEER)
    forged = [
        raw(b"{not json"),
        raw(b"\xff\xfe"),
        raw(b"[1, 2]"),
        raw(b""),
        raw(b" " * (65 << 10)),
        edit(first, v=2),
        edit(first, rid="another-request"),
        edit(first, len=first.nbytes + 4),
        edit(first, mem="GPU"),
        edit(first, mem=None),
        edit(first, addr=-1),
        edit(first, addr="12"),
        edit(first, dev=True),
        edit(first, md="***"),
        edit(first, nonce=base64.b64encode(b"short").decode()),
        edit(first, nonce=base64.b64encode(bytes(16)).decode()),
        edit(first, agent=""),
        edit(first, gmd=""),
    ]
    for meta in forged:
        metas = [meta, *out.metas[1:]]
        with pytest.raises(DescriptorError):
            b.check("r", metas)
        with pytest.raises(DescriptorError):
            await b.fetch("r", metas, no_inline())
    wrong_nbytes = pb.TensorMeta()
    wrong_nbytes.CopyFrom(first)
    wrong_nbytes.nbytes += 4  # shape and nbytes disagree
    mixed_agents = [first, other_out.metas[1]]  # two publications in one header
    inline = pb.TensorMeta()
    inline.CopyFrom(first)
    inline.location = pb.INLINE
    for metas in ([wrong_nbytes], mixed_agents, [inline]):
        with pytest.raises(DescriptorError):
            b.check("r", metas)
    # Well formed, but the metadata is another agent's.
    with pytest.raises(DescriptorError):
        await b.fetch(
            "r", [edit(first, md=json.loads(other_out.metas[0].handle)["md"])], no_inline()
        )
    # Well formed, but memory the sender never registered: NIXL refuses it.
    shifted = edit(first, addr=doc["addr"] + (1 << 30))
    overrun = edit(payload_meta(first, 2 * first.nbytes), len=2 * first.nbytes)
    for meta in (shifted, overrun):
        b.check("r", [meta])
        with pytest.raises((DescriptorError, TransferError)):
            await b.fetch("r", [meta], no_inline())
    # The genuine handles still work.
    assert_same(await b.fetch("r", out.metas, no_inline()), payload("mixed"))
    await other_out.release()
    await other.close()
    await out.release()


def payload_meta(meta: pb.TensorMeta, nbytes: int) -> pb.TensorMeta:
    """`meta` claiming `nbytes` of float32 (a consistent but larger shape)."""
    out = pb.TensorMeta()
    out.CopyFrom(meta)
    del out.shape[:]
    out.shape.append(nbytes // 4)
    out.dtype = "float32"
    out.nbytes = nbytes
    return out


def test_options_and_registry() -> None:
    backend = open_backend("nixl", {"poll_sleep_us": "50", "timeout_s": "2"})
    assert isinstance(backend, NixlBackend)
    assert backend.endpoint().startswith("disagfusion-")
    assert backend.reaches(PEER)
    assert not backend.reaches(Peer("127.0.0.1:1"))
    asyncio.run(backend.close())
    for bad in ({"nope": "1"}, {"timeout_s": "0"}, {"poll_sleep_us": "x"}):
        with pytest.raises(ValueError):
            NixlBackend(bad)


def test_missing_nixl_is_transport_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from disagfusion.worker.transport import TransportUnavailable

    for package in ("nixl_cu12", "nixl_cu13", "nixl"):
        monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, "disagfusion.worker.transport.nixl")
    with pytest.raises(TransportUnavailable, match="NIXL is not installed"):
        open_backend("nixl")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_tensors_stay_on_the_gpu() -> None:
    a = NixlBackend({"timeout_s": "10"})
    b = NixlBackend({"timeout_s": "10"}, device="cuda:0")
    try:
        want = {k: v.to("cuda:0") for k, v in payload("mixed").items()}
        out = await a.publish("g", want, PEER)
        assert json.loads(out.metas[0].handle)["mem"] == "VRAM"
        got = await b.fetch("g", out.metas, no_inline())
        assert all(t.is_cuda for t in got.values())
        assert_same(got, want)
        cpu = NixlBackend({"timeout_s": "10"})
        assert_same(await cpu.fetch("g", out.metas, no_inline()), payload("mixed"))
        await cpu.close()
        await out.release()
    finally:
        await a.close()
        await b.close()
