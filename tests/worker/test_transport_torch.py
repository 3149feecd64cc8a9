"""The `torch` transport between real processes: each node is a spawned process
running an asyncio loop with one TorchBackend, driven over a Pipe (metas cross
as serialized TensorMeta, tensors are rebuilt on both sides from a seed)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

import pytest
import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.transport import open_backend
from disagfusion.worker.transport.base import DescriptorError, Peer, TransferError, meta_for
from disagfusion.worker.transport.torch import (
    THREAD_PREFIX,
    TorchBackend,
    encode_handle,
    parse_endpoint,
)

CTX = multiprocessing.get_context("spawn")
# Short timeouts so that a dead peer's consequences show within the test's patience.
OPTIONS = {"host": "127.0.0.1", "connect_timeout_s": "3", "timeout_s": "10"}
BIG = 256 << 20

# name -> (shape, dtype, seed); a negative seed: contents unchecked (large buffers).
Spec = dict[str, tuple[tuple[int, ...], str, int]]


def make_tensors(spec: Spec, device: str = "cpu") -> dict[str, torch.Tensor]:
    out = {}
    for name, (shape, dtype_name, seed) in spec.items():
        dtype = getattr(torch, dtype_name)
        if seed < 0:
            out[name] = torch.empty(shape, dtype=dtype, device=device)
            continue
        g = torch.Generator().manual_seed(seed)
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        elif dtype == torch.uint8:
            t = torch.randint(0, 256, shape, generator=g, dtype=dtype)
        else:
            t = torch.randint(-(2**62), 2**62, shape, generator=g, dtype=dtype)
        out[name] = t.to(device)
    return out


async def no_inline() -> AsyncIterator[bytes]:
    return
    yield b""


# ---- the node process ---------------------------------------------------------


def _node_main(conn: Connection, options: dict[str, str], device: str) -> None:
    asyncio.run(_serve(conn, options, device))


async def _serve(conn: Connection, options: dict[str, str], device: str) -> None:
    backend = TorchBackend(options, device)
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    outgoing: dict[str, Any] = {}
    tasks: set[asyncio.Task[None]] = set()
    send_lock = threading.Lock()

    def read() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = None
            loop.call_soon_threadsafe(inbox.put_nowait, msg)
            if msg is None or msg[1] == "close":
                return

    def reply(mid: int, result: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send((mid, result))

    async def run(cmd: str, args: tuple[Any, ...]) -> Any:
        if cmd == "endpoint":
            return backend.endpoint()
        if cmd == "publish":
            rid, spec, address, endpoint = args
            peer = Peer(address, frozenset({"grpc", "torch"}), {"torch": endpoint})
            out = await backend.publish(rid, make_tensors(spec, device), peer)
            outgoing[rid] = out
            return [m.SerializeToString() for m in out.metas]
        if cmd == "start":
            (rid,) = args
            out = outgoing.pop(rid)
            t0 = time.monotonic()
            try:
                await out.start()
            finally:
                await out.release()
            return time.monotonic() - t0
        if cmd == "fetch":
            rid, raw, spec = args
            metas = [pb.TensorMeta.FromString(b) for b in raw]
            backend.check(rid, metas)
            got = await backend.fetch(rid, metas, no_inline())
            want = make_tensors({k: v for k, v in spec.items() if v[2] >= 0})
            result = {}
            for name, (shape, dtype_name, _) in spec.items():
                t = got[name]
                ok = tuple(t.shape) == tuple(shape) and t.dtype == getattr(torch, dtype_name)
                if name in want:
                    ok = ok and torch.equal(t.cpu(), want[name])
                result[name] = (ok, str(t.device))
            return result
        if cmd == "forget":
            backend.forget(args[0])
            return None
        raise ValueError(cmd)

    async def handle(mid: int, cmd: str, args: tuple[Any, ...]) -> None:
        try:
            result: tuple[Any, ...] = ("ok", await run(cmd, args))
        except Exception as err:
            result = ("err", type(err).__name__, str(err))
        reply(mid, result)

    threading.Thread(target=read, daemon=True).start()
    while True:
        msg = await inbox.get()
        if msg is None:
            break
        mid, cmd, args = msg
        if cmd == "close":
            await backend.close()
            for task in tasks:
                task.cancel()
            # A gloo wait stuck on a peer killed mid-transfer ends on its own timeout.
            deadline = time.monotonic() + backend.timeout_s + 2
            while time.monotonic() < deadline and _our_threads():
                await asyncio.sleep(0.05)
            reply(mid, ("ok", _our_threads()))
            break
        task = asyncio.create_task(handle(mid, cmd, args))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def _our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


# ---- the test side ------------------------------------------------------------


class Remote(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def result(fut: Future[Any], timeout: float = 30) -> Any:
    outcome = fut.result(timeout)
    if outcome[0] == "err":
        raise Remote(outcome[1], outcome[2])
    return outcome[1]


class Node:
    """A spawned process with one TorchBackend."""

    def __init__(self, device: str = "cpu", options: dict[str, str] | None = None) -> None:
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(
            target=_node_main, args=(child, options or OPTIONS, device), daemon=True
        )
        self.proc.start()
        child.close()
        self._next = 0
        self._pending: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        self._endpoint = self.submit("endpoint")
        self.endpoint = ""
        self.address = ""

    def ready(self) -> Node:
        self.endpoint = result(self._endpoint, 60)
        port, _ = parse_endpoint(self.endpoint)
        self.address = f"127.0.0.1:{port}"  # the store port doubles as a unique address
        return self

    def _read(self) -> None:
        while True:
            try:
                mid, outcome = self.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                fut = self._pending.pop(mid)
            fut.set_result(outcome)
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for fut in pending:
            fut.set_result(("err", "Died", "the node exited"))

    def submit(self, cmd: str, *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            self._next += 1
            self._pending[self._next] = fut
            self.conn.send((self._next, cmd, args))
        return fut

    def call(self, cmd: str, *args: Any, timeout: float = 30) -> Any:
        return result(self.submit(cmd, *args), timeout)

    def publish(self, rid: str, spec: Spec, to: Node) -> list[bytes]:
        metas: list[bytes] = self.call("publish", rid, spec, to.address, to.endpoint)
        return metas

    def kill(self) -> None:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if not self.proc.is_alive():
            return
        leftover = self.call("close", timeout=30)
        self.proc.join(15)
        assert self.proc.exitcode == 0, f"node exited with {self.proc.exitcode}"
        assert leftover == [], f"transport threads left running: {leftover}"


def transfer(sender: Node, receiver: Node, rid: str, spec: Spec) -> dict[str, Any]:
    metas = sender.publish(rid, spec, receiver)
    fetched = receiver.submit("fetch", rid, metas, spec)
    started = sender.submit("start", rid)
    got: dict[str, Any] = result(fetched)
    result(started)
    return got


def all_ok(got: dict[str, Any]) -> bool:
    return all(ok for ok, _ in got.values())


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[Node, Node, Node]]:
    """Two senders and a receiver, shared by the module's tests."""
    started = [Node(), Node(), Node()]
    try:
        first, second, receiver = (n.ready() for n in started)
        yield first, second, receiver
    finally:
        for n in started:
            n.close()


MIXED: Spec = {
    "latents": ((2, 4, 16, 16), "float32", 1),
    "embeds": ((3, 77, 64), "bfloat16", 2),
    "image": ((64, 64, 3), "uint8", 3),
    "ids": ((7,), "int64", 4),
    "empty": ((0, 5), "float32", 5),
    "mask": ((9,), "bool", 6),
    "scale": ((), "float16", 7),
}


def test_round_trip_every_dtype(nodes: tuple[Node, Node, Node]) -> None:
    sender, _, receiver = nodes
    got = transfer(sender, receiver, "mixed", MIXED)
    assert set(got) == set(MIXED)
    assert all_ok(got), got
    assert {device for _, device in got.values()} == {"cpu"}


def test_many_payloads_in_a_row(nodes: tuple[Node, Node, Node]) -> None:
    sender, _, receiver = nodes
    for i in range(25):
        spec: Spec = {"x": ((i + 1, 33), "float32", i), "y": ((i,), "int64", 100 + i)}
        assert all_ok(transfer(sender, receiver, f"row-{i}", spec))


def test_concurrent_payloads_to_one_peer(nodes: tuple[Node, Node, Node]) -> None:
    sender, _, receiver = nodes
    specs: dict[str, Spec] = {
        f"c-{i}": {"a": ((1000 * (i + 1),), "float32", i), "b": ((5, i + 1), "bfloat16", 50 + i)}
        for i in range(8)
    }
    metas = {rid: sender.publish(rid, spec, receiver) for rid, spec in specs.items()}
    # The receiver fetches in the reverse order of the sender's starts: tags keep them apart.
    fetched = {
        rid: receiver.submit("fetch", rid, metas[rid], specs[rid]) for rid in reversed(specs)
    }
    started = [sender.submit("start", rid) for rid in specs]
    for fut in started:
        result(fut)
    for fut in fetched.values():
        assert all_ok(result(fut))


def test_two_senders_to_one_receiver(nodes: tuple[Node, Node, Node]) -> None:
    first, second, receiver = nodes
    futures = []
    for i in range(6):
        for n, sender in enumerate((first, second)):
            rid = f"two-{n}-{i}"
            spec: Spec = {"x": ((4096 + i,), "float32", 10 * n + i)}
            metas = sender.publish(rid, spec, receiver)
            futures.append(receiver.submit("fetch", rid, metas, spec))
            futures.append(sender.submit("start", rid))
    for fut in futures:
        outcome = result(fut)
        if isinstance(outcome, dict):
            assert all_ok(outcome)


def _error_within(fut: Future[Any], seconds: float) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        result(fut, seconds)
    except Remote as err:
        return err.kind, time.monotonic() - t0
    return "", time.monotonic() - t0


@pytest.mark.slow
def test_receivers_killed_and_added_while_traffic_flows(nodes: tuple[Node, Node, Node]) -> None:
    _, _, steady = nodes
    sender = Node(options={**OPTIONS, "timeout_s": "4"})
    mid_transfer, waiting, fresh = Node(), Node(), Node()
    for n in (sender, mid_transfer, waiting, fresh):
        n.ready()
    small: Spec = {"x": ((256,), "float32", 1)}
    for victim in (mid_transfer, waiting):
        assert all_ok(transfer(sender, victim, "warm", small))

    # Killed mid-transfer (or just after, on a fast machine): the send fails fast,
    # or the next one does.
    big: Spec = {"big": ((BIG,), "uint8", -1)}
    metas = sender.publish("big", big, mid_transfer)
    mid_transfer.submit("fetch", "big", metas, big)
    started = sender.submit("start", "big")
    time.sleep(0.02)
    mid_transfer.kill()
    kind, took = _error_within(started, 8)
    assert kind in ("", "TransferError") and took < 5
    if not kind:
        sender.publish("after", small, mid_transfer)
        kind, took = _error_within(sender.submit("start", "after"), 8)
        assert kind == "TransferError" and took < 5

    # Killed while the sender waits for it to post its receive.
    metas = sender.publish("stuck", small, waiting)
    started = sender.submit("start", "stuck")
    time.sleep(0.3)
    assert not started.done()
    waiting.kill()
    kind, took = _error_within(started, 8)
    assert kind == "TransferError" and took < 2

    # Traffic to the receiver that stayed, and to one that just joined, still flows.
    for i in range(3):
        assert all_ok(transfer(sender, steady, f"steady-{i}", small))
        assert all_ok(transfer(sender, fresh, f"fresh-{i}", MIXED))
    sender.call("forget", fresh.address)
    assert all_ok(transfer(sender, fresh, "after-forget", MIXED))
    fresh.close()
    sender.close()


@pytest.mark.slow
def test_sender_killed_mid_fetch(nodes: tuple[Node, Node, Node]) -> None:
    _, other, receiver = nodes
    victim = Node().ready()
    small: Spec = {"x": ((256,), "float32", 1)}
    assert all_ok(transfer(victim, receiver, "warm", small))
    metas = victim.publish("orphan", small, receiver)
    fetched = receiver.submit("fetch", "orphan", metas, small)
    time.sleep(0.3)
    assert not fetched.done()
    victim.kill()
    kind, took = _error_within(fetched, 8)
    assert kind == "TransferError" and took < 2
    assert all_ok(transfer(other, receiver, "still-serving", MIXED))


# ---- one process: descriptors, options, timeouts ------------------------------


def _meta(handle: bytes, name: str = "x") -> pb.TensorMeta:
    return meta_for(name, torch.empty(2, 3), pb.TORCH, handle)


GOOD_GROUP = "0123456789abcdef.1"


def _json(**fields: object) -> bytes:
    doc: dict[str, object] = {
        "group": GOOD_GROUP,
        "tag": 1,
        "backend": "gloo",
        "sender_host": "127.0.0.1",
        "sender_port": 5000,
    }
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not MISSING}).encode()


MISSING = object()


@pytest.mark.parametrize(
    "handle",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'"0123456789abcdef.1"',
        _json(sender_port=MISSING),
        _json(extra=1),
        _json(group="../../etc"),
        _json(group="0123456789ABCDEF.1"),
        _json(group="0123456789abcdef"),
        _json(group=7),
        _json(tag=0),
        _json(tag=2**31),
        _json(tag=-5),
        _json(tag="1"),
        _json(tag=True),
        _json(tag=1.0),
        _json(backend="mpi"),
        _json(backend=None),
        _json(group=GOOD_GROUP + ".nccl", backend="nccl"),  # no CUDA here
        _json(backend="nccl"),
        _json(group=GOOD_GROUP + ".nccl"),
        _json(sender_host="evil.example.com"),
        _json(sender_host=1),
        _json(sender_port=70000),
        _json(sender_port="80"),
        _json(sender_host="", sender_port=80),
        b" " * (65 << 10),
    ],
)
async def test_forged_handles_are_refused(handle: bytes) -> None:
    backend = TorchBackend(OPTIONS)
    try:
        with pytest.raises(DescriptorError):
            backend.check("r", [_meta(handle)])
        with pytest.raises(DescriptorError):
            await backend.fetch("r", [_meta(handle)], no_inline())
    finally:
        await backend.close()


async def test_payload_level_checks() -> None:
    backend = TorchBackend(OPTIONS)
    try:
        good = [_meta(encode_handle(GOOD_GROUP, 1, "gloo", "127.0.0.1"))]
        backend.check("r", good)
        backend.check("r", [])
        dup_tags = [
            _meta(encode_handle(GOOD_GROUP, 3, "gloo", "127.0.0.1"), "a"),
            _meta(encode_handle(GOOD_GROUP, 3, "gloo", "127.0.0.1"), "b"),
        ]
        two_groups = [
            _meta(encode_handle(GOOD_GROUP, 1, "gloo", "127.0.0.1"), "a"),
            _meta(encode_handle("0123456789abcdef.2", 2, "gloo", "127.0.0.1"), "b"),
        ]
        wrong_size = [_meta(encode_handle(GOOD_GROUP, 1, "gloo", ""))]
        wrong_size[0].nbytes = 7
        inline = [_meta(encode_handle(GOOD_GROUP, 1, "gloo", ""))]
        inline[0].location = pb.INLINE
        for metas in (dup_tags, two_groups, wrong_size, inline):
            with pytest.raises(DescriptorError):
                backend.check("r", metas)
    finally:
        await backend.close()


async def test_endpoint_reaches_and_options() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    backend = open_backend("torch", {"host": "127.0.0.1", "store_port": str(free)})
    assert isinstance(backend, TorchBackend)
    try:
        assert backend.endpoint() == f"port={free}"
        assert backend.pushes and backend.location == pb.TORCH
        assert parse_endpoint("port=123;cuda=GPU-1") == (123, "GPU-1")
        assert parse_endpoint("port=123;cuda") == (123, "")
        assert parse_endpoint("port=x") == (0, None)
        ep = {"torch": backend.endpoint()}
        assert backend.reaches(Peer("h:1", frozenset({"grpc", "torch"}), ep))
        assert not backend.reaches(Peer("h:1", frozenset({"grpc"}), ep))
        assert not backend.reaches(Peer("h:1", frozenset({"grpc", "torch"}), {}))
    finally:
        await backend.close()
    for bad in ({"bogus": "1"}, {"timeout_s": "0"}, {"store_port": "99999"}, {"timeout_s": "x"}):
        with pytest.raises(ValueError):
            TorchBackend(bad)


async def test_group_that_never_forms_times_out() -> None:
    receiver = TorchBackend({**OPTIONS, "connect_timeout_s": "0.5"})
    sender = TorchBackend({**OPTIONS, "connect_timeout_s": "0.5"})
    try:
        metas = [_meta(encode_handle(GOOD_GROUP, 1, "gloo", "127.0.0.1"))]
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            await receiver.fetch("r", metas, no_inline())
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        with pytest.raises(TransferError):  # a dropped group is refused at once
            await receiver.fetch("r", metas, no_inline())
        assert time.monotonic() - t0 < 0.5

        # A sender whose receiver never joins: start fails, the next publish starts afresh.
        peer = Peer("127.0.0.1:1", frozenset({"grpc", "torch"}), {"torch": receiver.endpoint()})
        out = await sender.publish("r", {"x": torch.ones(3)}, peer)
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            await out.start()
        assert time.monotonic() - t0 < 5
        await out.release()
        again = await sender.publish("r", {"x": torch.ones(3)}, peer)
        assert again.metas[0].handle != out.metas[0].handle
        await again.release()
        assert (await sender.publish("r", {}, peer)).metas == []
    finally:
        await sender.close()
        await receiver.close()
    deadline = time.monotonic() + 5
    while _our_threads() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert _our_threads() == []


async def test_in_process_round_trip_and_forget() -> None:
    sender, receiver = TorchBackend(OPTIONS), TorchBackend(OPTIONS)
    try:
        peer = Peer("127.0.0.1:2", frozenset({"grpc", "torch"}), {"torch": receiver.endpoint()})
        handles = set()
        for _ in range(2):
            tensors = make_tensors(MIXED)
            tensors["strided"] = torch.arange(24.0).reshape(4, 6).t()  # not contiguous
            out = await sender.publish("r", tensors, peer)
            handles.add(out.metas[0].handle)
            receiver.check("r", out.metas)
            fetch = asyncio.ensure_future(receiver.fetch("r", out.metas, no_inline()))
            await out.start()
            got = await fetch
            await out.release()
            assert all(torch.equal(got[k], tensors[k]) for k in tensors)
            sender.forget(peer.address)  # the next payload forms a new group
        assert len({h.split(b'"tag"')[0] for h in handles}) == 2
    finally:
        await sender.close()
        await receiver.close()


# ---- GPU ----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_tensors_between_processes() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    spec: Spec = {"latents": ((16 << 20,), "float32", 1), "tail": ((3, 5), "bfloat16", 2)}
    pairs = [("cuda:0", "cuda:0")]  # one GPU: gloo through the host (NCCL refuses it)
    if torch.cuda.device_count() > 1:
        pairs.append(("cuda:0", "cuda:1"))  # two GPUs: NCCL, device to device
    for send_on, recv_on in pairs:
        sender, receiver = Node(send_on), Node(recv_on)
        try:
            sender.ready()
            receiver.ready()
            assert parse_endpoint(receiver.endpoint)[1] is not None
            for i in range(3):
                got = transfer(sender, receiver, f"gpu-{i}", spec)
                assert all_ok(got), got
            devices = {device for _, device in got.values()}
            assert devices == ({"cpu"} if send_on == recv_on else {recv_on})
        finally:
            sender.close()
            receiver.close()
