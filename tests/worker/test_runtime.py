"""The data plane in-process: real gRPC servers on 127.0.0.1, fake compute, fake gateway.

Compute runs in the runtime's thread executor, so a fake compute that blocks on
a threading.Event holds a request "computing" until the test releases it;
everything else is observed by polling with a bounded wait, never by sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.gateway.api import RequestLimits
from disagfusion.worker.gateway.service import Gateway, GatewayConfig, build_http_app
from disagfusion.worker.metrics import HandoffMetrics
from disagfusion.worker.params import GenerationParams, WorkerRole
from disagfusion.worker.runtime import sender as sender_module
from disagfusion.worker.runtime.payload import (
    Payload,
    data_chunks,
    header_of,
    params_from_proto,
    payload_from,
    read_tensors,
)
from disagfusion.worker.runtime.peers import ChannelCache, PeerPool
from disagfusion.worker.runtime.sender import Sender
from disagfusion.worker.runtime.stage import RuntimeConfig, StageRuntime, start_grpc_server

HOST = "127.0.0.1"
WAIT_S = 10.0
PIPELINE = "test"
ROLE: WorkerRole = "decoder"

# ----------------------------------------------------------------------------- helpers

_used_ports: set[int] = set()


def free_port() -> int:
    """A port nobody in this process has used yet (gRPC binds with SO_REUSEPORT)."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port


async def wait_until(cond: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.005)


def status(ack: object) -> str:
    if ack is grpc.aio.EOF:
        return "EOF"
    assert isinstance(ack, pb.Ack)
    return pb.Ack.Status.Name(ack.status)


def payload(rid: str, reply_to: str, deadline_unix: float = 0.0) -> Payload:
    """The prompt carries the request id so the fake compute can tell requests apart."""
    return Payload(
        request_id=rid,
        params=GenerationParams(prompt=rid),
        tensors={"x": torch.arange(4, dtype=torch.float32)},
        deadline_unix=deadline_unix,
        reply_to=reply_to,
        pipeline=PIPELINE,
        model="fake",
        source_stage="denoiser",
    )


class FakeCompute:
    """`(params, tensors) -> tensors`; records calls by prompt; can block or raise."""

    def __init__(self, block: bool = False, error: Exception | None = None) -> None:
        self.block = block
        self.error = error
        self.calls: list[str] = []
        self.active: set[str] = set()
        self._gates: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._released_all = False

    def _gate(self, rid: str) -> threading.Event:
        with self._lock:
            gate = self._gates.setdefault(rid, threading.Event())
            if self._released_all:
                gate.set()
            return gate

    def release(self, rid: str) -> None:
        self._gate(rid).set()

    def release_all(self) -> None:
        with self._lock:
            self._released_all = True
            for gate in self._gates.values():
                gate.set()

    def __call__(
        self, params: GenerationParams, tensors: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        rid = params.prompt
        self.calls.append(rid)
        self.active.add(rid)
        try:
            if self.block and not self._gate(rid).wait(WAIT_S):
                raise RuntimeError(f"test never released {rid}")
            if self.error is not None:
                raise self.error
            return {"out": tensors["x"] * 2}
        finally:
            self.active.discard(rid)


class FakeGateway(pb_grpc.StageServicer):
    """Receives terminal payloads (images or errors) sent to reply_to."""

    def __init__(self) -> None:
        self.results: list[Payload] = []

    def of(self, rid: str) -> list[Payload]:
        return [p for p in self.results if p.request_id == rid]

    async def Health(self, request: pb.HealthRequest, context: object) -> pb.HealthReply:
        return pb.HealthReply(stage="gateway", ready=True)

    async def Submit(
        self, request_iterator: AsyncIterator[pb.WorkChunk], context: object
    ) -> AsyncIterator[pb.Ack]:
        stream = request_iterator.__aiter__()
        header = (await stream.__anext__()).header
        tensors = await read_tensors(header, stream)
        self.results.append(payload_from(header, tensors))
        yield pb.Ack(request_id=header.request_id, status=pb.Ack.RECEIVED)
        yield pb.Ack(request_id=header.request_id, status=pb.Ack.DONE)


class SubmitStream:
    """One Submit stream opened directly against a worker; acks are read as they come."""

    def __init__(
        self,
        stub: pb_grpc.StageStub,
        p: Payload,
        header: pb.WorkHeader | None = None,
        chunks: Iterable[pb.WorkChunk] | None = None,
        finish: bool = True,
    ) -> None:
        self.call = stub.Submit()
        self._writer = asyncio.create_task(
            self._write(
                header or header_of(p), list(data_chunks(p) if chunks is None else chunks), finish
            )
        )

    async def _write(self, header: pb.WorkHeader, chunks: list[pb.WorkChunk], finish: bool) -> None:
        # A receiver that rejects on the header may end the call before all is written.
        with contextlib.suppress(Exception):
            await self.call.write(pb.WorkChunk(header=header))
            for chunk in chunks:
                await self.call.write(chunk)
            if finish:
                await self.call.done_writing()

    async def ack(self) -> pb.Ack:
        ack = await asyncio.wait_for(self.call.read(), WAIT_S)
        assert ack is not grpc.aio.EOF, "stream ended without a further ack"
        assert isinstance(ack, pb.Ack)
        return ack

    async def rest(self) -> list[str]:
        """Statuses of the remaining acks, until the stream ends."""
        out: list[str] = []
        while True:
            ack = await asyncio.wait_for(self.call.read(), WAIT_S)
            if ack is grpc.aio.EOF:
                return out
            out.append(status(ack))

    async def close(self) -> None:
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self.call.cancel()


@dataclass
class Stage:
    runtime: StageRuntime
    addr: str
    server: grpc.aio.Server
    compute: FakeCompute


class Cluster:
    """Owns every server, runtime, sender and stream a test starts, and stops them."""

    def __init__(self) -> None:
        self.channels = ChannelCache()
        self.servers: list[grpc.aio.Server] = []
        self.stages: list[Stage] = []
        self.streams: list[SubmitStream] = []
        self.closers: list[Callable[[], Awaitable[object]]] = []

    def stub(self, addr: str) -> pb_grpc.StageStub:
        return self.channels.stub(addr)

    async def serve(self, servicer: pb_grpc.StageServicer, port: int | None = None) -> str:
        port = port or free_port()
        self.servers.append(await start_grpc_server(servicer, HOST, port))
        return f"{HOST}:{port}"

    async def gateway(self) -> tuple[FakeGateway, str]:
        gw = FakeGateway()
        return gw, await self.serve(gw)

    async def stage(
        self,
        compute: FakeCompute,
        *,
        overlap: bool = True,
        queue_capacity: int = 2,
        input_error: type[Exception] = ValueError,
        port: int | None = None,
    ) -> Stage:
        runtime = StageRuntime(
            RuntimeConfig(
                role=ROLE,
                model="fake",
                pipeline=PIPELINE,
                queue_capacity=queue_capacity,
                overlap=overlap,
                drain_timeout_s=WAIT_S,
            ),
            input_error=input_error,
        )
        addr = await self.serve(runtime, port)
        stage = Stage(runtime, addr, self.servers[-1], compute)
        self.stages.append(stage)
        runtime.start()
        await runtime.load(lambda: compute)
        return stage

    def submit(self, addr: str, p: Payload, **kwargs: object) -> SubmitStream:
        stream = SubmitStream(self.stub(addr), p, **kwargs)  # type: ignore[arg-type]
        self.streams.append(stream)
        return stream

    def sender(self, addrs: list[str]) -> tuple[Sender, PeerPool]:
        pool = PeerPool("next", addrs, self.channels, poll_interval_s=0.05)
        pool.start()
        sender = Sender(
            "upstream",
            self.channels,
            HandoffMetrics(CollectorRegistry(), "upstream", PIPELINE),
            pool=pool,
        )
        self.closers += [sender.close, pool.stop]
        return sender, pool

    async def close(self) -> None:
        for stream in self.streams:
            await _bounded("closing a submit stream", stream.close())
        for closer in reversed(self.closers):
            await _bounded(f"closing {closer!r}", closer())
        for server in self.servers:
            await _bounded("stopping a gRPC server", server.stop(0))
        for stage in self.stages:
            stage.compute.release_all()
        # Let compute threads return while the loop still runs, then stop the runtimes.
        await wait_until(
            lambda: not any(s.compute.active for s in self.stages), "compute threads to finish"
        )
        for stage in self.stages:
            await _bounded("stopping a runtime", stage.runtime.stop())
        await _bounded("closing channels", self.channels.close())


async def _bounded(what: str, step: Awaitable[object]) -> None:
    """Run a teardown step; fail naming it (and what hangs) instead of hanging."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=WAIT_S)
    if not done:
        hung = []
        for t in asyncio.all_tasks():
            coro: Any = t.get_coro()
            chain = []
            while coro is not None and hasattr(coro, "cr_frame"):
                if coro.cr_frame is not None:
                    chain.append(f"{coro.cr_code.co_name}:{coro.cr_frame.f_lineno}")
                coro = coro.cr_await
            hung.append(" > ".join(chain))
        task.cancel()
        pytest.fail(f"teardown: {what} took over {WAIT_S:g}s; tasks: " + "; ".join(hung))
    task.result()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()


def metric(runtime: StageRuntime, name: str, **labels: str) -> float | None:
    """A sample from the runtime's /metrics exposition, by name and (partial) labels."""
    text = generate_latest(runtime.metrics.registry).decode()
    want = {"pipeline": PIPELINE, "stage": ROLE, **labels}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in want.items()):
                return sample.value
    return None


def rejected(stage: Stage, reason: str) -> float:
    return metric(stage.runtime, "disagfusion_stage_requests_rejected_total", reason=reason) or 0.0


# ----------------------------------------------------------------------------- overlap


async def test_overlap_receives_next_payload_and_hands_off_while_computing(
    cluster: Cluster,
) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute)

    a = cluster.submit(stage.addr, payload("A", gw_addr))
    assert status(await a.ack()) == "RECEIVED"
    await wait_until(lambda: compute.active == {"A"}, "A computing")

    # B's bytes are received and queued while A still computes.
    b = cluster.submit(stage.addr, payload("B", gw_addr))
    assert status(await b.ack()) == "RECEIVED"
    assert compute.active == {"A"}
    health = await cluster.stub(stage.addr).Health(pb.HealthRequest())
    assert (health.queue_depth, health.in_flight) == (1, 2)

    # A's output leaves for the gateway while B computes.
    compute.release("A")
    await wait_until(lambda: gw.of("A"), "A's output at the gateway")
    assert status(await a.ack()) == "DONE"
    await wait_until(lambda: compute.active == {"B"}, "B computing")
    assert not gw.of("B")

    compute.release("B")
    assert await b.rest() == ["DONE"]
    assert compute.calls == ["A", "B"]
    assert torch.equal(gw.of("A")[0].tensors["out"], torch.arange(4, dtype=torch.float32) * 2)
    assert gw.of("A")[0].source_stage == ROLE


async def test_overlap_off_rejects_a_second_payload_as_busy_until_the_first_is_handed_off(
    cluster: Cluster,
) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute, overlap=False)

    a = cluster.submit(stage.addr, payload("A", gw_addr))
    assert status(await a.ack()) == "RECEIVED"
    await wait_until(lambda: compute.active == {"A"}, "A computing")

    b = cluster.submit(stage.addr, payload("B", gw_addr))
    ack = await b.ack()
    assert (status(ack), ack.reason, ack.retryable) == ("REJECTED", "busy", True)
    assert await b.rest() == []

    compute.release("A")
    assert await a.rest() == ["DONE"]
    assert gw.of("A")

    b = cluster.submit(stage.addr, payload("B", gw_addr))
    assert status(await b.ack()) == "RECEIVED"
    compute.release("B")
    assert await b.rest() == ["DONE"]
    assert compute.calls == ["A", "B"]
    assert len(gw.results) == 2


async def test_overlap_off_sender_retries_a_busy_worker_until_it_takes_the_payload(
    cluster: Cluster,
) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute, overlap=False)
    sender, pool = cluster.sender([stage.addr])
    await wait_until(lambda: pool.ready_count() == 1, "worker ready in the pool")

    await sender.hand_off(payload("A", gw_addr))
    await wait_until(lambda: compute.active == {"A"}, "A computing")
    handing_b = asyncio.create_task(sender.hand_off(payload("B", gw_addr)))
    await wait_until(lambda: rejected(stage, "busy") >= 1, "B refused as busy")
    assert not handing_b.done()

    compute.release("A")
    await asyncio.wait_for(handing_b, WAIT_S)
    compute.release("B")
    await wait_until(lambda: gw.of("B"), "B at the gateway")
    assert await sender.drain(WAIT_S)
    assert compute.calls == ["A", "B"]
    assert [p.request_id for p in gw.results] == ["A", "B"]


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "one-by-one"])
async def test_sender_spreads_work_across_instances(cluster: Cluster, concurrent: bool) -> None:
    _, gw_addr = await cluster.gateway()
    computes = [FakeCompute(block=True), FakeCompute(block=True)]
    stages = [await cluster.stage(c) for c in computes]
    sender, pool = cluster.sender([s.addr for s in stages])
    await wait_until(lambda: pool.ready_count() == 2, "both workers ready in the pool")

    first = [payload("p1", gw_addr), payload("p2", gw_addr)]
    if concurrent:
        await asyncio.gather(*(sender.hand_off(p) for p in first))
    else:
        for p in first:
            await sender.hand_off(p)
    await wait_until(lambda: sum(len(c.calls) for c in computes) == 2, "both computing")
    assert [len(c.calls) for c in computes] == [1, 1], "one instance idles while one has work"

    # Two more: each instance queues one behind its computing request.
    for p in (payload("p3", gw_addr), payload("p4", gw_addr)):
        await sender.hand_off(p)
    assert [metric(s.runtime, "disagfusion_stage_queue_depth") for s in stages] == [1, 1]


# ----------------------------------------------------------------------------- custody


async def test_payload_is_redelivered_when_the_receiving_instance_dies(cluster: Cluster) -> None:
    gw, gw_addr = await cluster.gateway()
    dying = await cluster.stage(FakeCompute(block=True))
    spare_port = free_port()
    sender, pool = cluster.sender([dying.addr, f"{HOST}:{spare_port}"])
    await wait_until(lambda: pool.ready_count() == 1, "first worker ready")

    await sender.hand_off(payload("R", gw_addr))
    await wait_until(lambda: dying.compute.active == {"R"}, "R computing on the first worker")
    assert sender.held == 1  # received downstream, kept until DONE

    spare = await cluster.stage(FakeCompute(), port=spare_port)
    await wait_until(lambda: pool.ready_count() == 2, "spare worker ready")
    await dying.server.stop(0)

    await wait_until(lambda: gw.of("R"), "R delivered by the spare worker")
    assert await sender.drain(WAIT_S)
    assert sender.held == 0
    assert spare.compute.calls == ["R"]
    assert len(gw.of("R")) == 1
    assert not gw.of("R")[0].error


# ----------------------------------------------------------------------------- duplicates


async def test_duplicate_submissions_are_computed_once_and_all_end_done(cluster: Cluster) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute)

    first = cluster.submit(stage.addr, payload("D", gw_addr))
    assert status(await first.ack()) == "RECEIVED"
    await wait_until(lambda: compute.active == {"D"}, "D computing")
    while_computing = cluster.submit(stage.addr, payload("D", gw_addr))
    assert status(await while_computing.ack()) == "RECEIVED"

    compute.release("D")
    assert await first.rest() == ["DONE"]
    assert await while_computing.rest() == ["DONE"]

    after_finish = cluster.submit(stage.addr, payload("D", gw_addr))
    assert await after_finish.rest() == ["RECEIVED", "DONE"]

    assert compute.calls == ["D"]
    assert len(gw.of("D")) == 1
    assert metric(stage.runtime, "disagfusion_stage_duplicates_total") == 2


async def test_duplicate_that_joined_a_copy_which_never_arrives_is_delivered_again(
    cluster: Cluster,
) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute()
    stage = await cluster.stage(compute)
    p = payload("H", gw_addr)

    # The first copy stalls half-way: its sender is about to die.
    first = cluster.submit(stage.addr, p, chunks=[pb.WorkChunk(data=b"\0" * 8)], finish=False)
    await wait_until(
        lambda: metric(stage.runtime, "disagfusion_stage_in_flight") == 1, "first copy arriving"
    )
    sender, pool = cluster.sender([stage.addr])
    await wait_until(lambda: pool.ready_count() == 1, "worker ready in the pool")
    await sender.hand_off(p)  # a retry from elsewhere joins the copy being received
    assert metric(stage.runtime, "disagfusion_stage_duplicates_total") == 1

    await first.close()
    await wait_until(lambda: gw.of("H"), "H computed from the second copy")
    assert await sender.drain(WAIT_S)
    assert compute.calls == ["H"]
    assert len(gw.of("H")) == 1


async def test_sender_close_ends_custody_even_when_grpc_absorbs_the_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """grpc.aio can swallow a task's cancellation while a call starts or fails; the
    attempt then just returns BROKEN. close() must still end the custody task."""
    attempts = 0

    async def absorbing_attempt(
        self: Sender, address: str, p: Payload, received: asyncio.Future[None]
    ) -> tuple[object, str]:
        nonlocal attempts
        attempts += 1
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return sender_module._Outcome.BROKEN, "absorbed"

    monkeypatch.setattr(Sender, "_attempt", absorbing_attempt)
    channels = ChannelCache()
    sender = Sender("x", channels, HandoffMetrics(CollectorRegistry(), "x", PIPELINE))
    handing = asyncio.create_task(sender.hand_off(payload("C", f"{HOST}:1")))
    await wait_until(lambda: attempts == 1, "the first attempt")

    closing = asyncio.create_task(sender.close())
    done, _ = await asyncio.wait({closing}, timeout=WAIT_S)
    handing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await handing
    assert done, "Sender.close() hangs on a custody task whose cancel was absorbed"
    assert sender.held == 0
    await channels.close()


async def test_peer_pool_stop_ends_polling_even_when_grpc_absorbs_the_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancelled health call may surface as an RPC error instead of CancelledError."""
    calls = 0

    class AbsorbingStub:
        async def Health(self, request: pb.HealthRequest, timeout: float) -> pb.HealthReply:
            nonlocal calls
            calls += 1
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
            )

    channels = ChannelCache()
    monkeypatch.setattr(channels, "stub", lambda address: AbsorbingStub())
    pool = PeerPool("next", [f"{HOST}:1"], channels, poll_interval_s=0.01)
    pool.start()
    await wait_until(lambda: calls == 1, "the first health call")
    stopping = asyncio.create_task(pool.stop())
    done, _ = await asyncio.wait({stopping}, timeout=WAIT_S)
    assert done, "PeerPool.stop() hangs on a poll whose cancel was absorbed"


# ----------------------------------------------------------------------------- errors


class BadInput(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        (BadInput("prompt is too long for this model"), 400, "prompt is too long"),
        (RuntimeError("out of memory: boom"), 500, "boom"),
        (ValueError("a ValueError is not this model's input error"), 500, "not this model"),
    ],
    ids=["input-error", "crash", "other-value-error"],
)
async def test_compute_errors_end_the_request_at_the_gateway(
    cluster: Cluster, error: Exception, code: int, text: str
) -> None:
    gw, gw_addr = await cluster.gateway()
    stage = await cluster.stage(FakeCompute(error=error), input_error=BadInput)

    s = cluster.submit(stage.addr, payload("E", gw_addr))
    assert await s.rest() == ["RECEIVED", "DONE"]
    [result] = gw.of("E")
    assert result.error_code == code
    assert text in result.error
    assert result.tensors == {}
    assert result.source_stage == ROLE
    reason = "bad_input" if code == 400 else "error"
    assert metric(stage.runtime, "disagfusion_stage_requests_failed_total", reason=reason) == 1


async def test_passed_deadline_ends_with_504_without_computing(cluster: Cluster) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute()
    stage = await cluster.stage(compute)

    s = cluster.submit(stage.addr, payload("late", gw_addr, deadline_unix=time.time() - 1.0))
    assert await s.rest() == ["RECEIVED", "DONE"]
    [result] = gw.of("late")
    assert result.error_code == 504
    assert "deadline" in result.error
    assert compute.calls == []


def _bad_nbytes(p: Payload) -> pb.WorkHeader:
    h = header_of(p)
    h.tensors[0].nbytes += 4
    return h


@pytest.mark.parametrize(
    ("make_header", "make_chunks", "reason"),
    [
        (_bad_nbytes, None, "nbytes"),
        (header_of, lambda p: [pb.WorkChunk(data=b"\0" * 8)], "ended after 8 of 16 bytes"),
        (header_of, lambda p: [pb.WorkChunk(data=b"\0" * 20)], "more than the 16 bytes"),
    ],
    ids=["nbytes-mismatch", "short-stream", "overlong-stream"],
)
async def test_invalid_payload_is_rejected_for_good_and_the_worker_keeps_serving(
    cluster: Cluster,
    make_header: Callable[[Payload], pb.WorkHeader],
    make_chunks: Callable[[Payload], list[pb.WorkChunk]] | None,
    reason: str,
) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute()
    stage = await cluster.stage(compute)

    bad = payload("bad", gw_addr)
    s = cluster.submit(
        stage.addr,
        bad,
        header=make_header(bad),
        chunks=None if make_chunks is None else make_chunks(bad),
    )
    ack = await s.ack()
    assert (status(ack), ack.retryable) == ("REJECTED", False)
    assert reason in ack.reason
    assert await s.rest() == []
    assert rejected(stage, "invalid") == 1

    good = cluster.submit(stage.addr, payload("good", gw_addr))
    assert await good.rest() == ["RECEIVED", "DONE"]
    assert compute.calls == ["good"]
    assert [p.request_id for p in gw.results] == ["good"]
    health = await cluster.stub(stage.addr).Health(pb.HealthRequest())
    assert (health.queue_depth, health.in_flight, health.completed_total) == (0, 0, 1)


# ----------------------------------------------------------------------------- draining


async def test_drain_refuses_new_work_and_finishes_held_work(cluster: Cluster) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute)
    stub = cluster.stub(stage.addr)

    a = cluster.submit(stage.addr, payload("A", gw_addr))
    assert status(await a.ack()) == "RECEIVED"
    await wait_until(lambda: compute.active == {"A"}, "A computing")

    draining = asyncio.create_task(stage.runtime.drain())
    await wait_until(lambda: stage.runtime.draining, "drain to start")
    b = cluster.submit(stage.addr, payload("B", gw_addr))
    ack = await b.ack()
    assert (status(ack), ack.reason, ack.retryable) == ("REJECTED", "draining", True)
    health = await stub.Health(pb.HealthRequest())
    assert (health.draining, health.ready, health.in_flight) == (True, False, 1)
    assert metric(stage.runtime, "disagfusion_stage_ready") == 0
    assert not draining.done()

    compute.release("A")
    assert await asyncio.wait_for(draining, WAIT_S) is True
    assert await a.rest() == ["DONE"]
    assert [p.request_id for p in gw.results] == ["A"]
    assert compute.calls == ["A"]


# ----------------------------------------------------------------------------- metrics


async def test_metrics_count_completed_requests_and_handoff_bytes(cluster: Cluster) -> None:
    gw, gw_addr = await cluster.gateway()
    stage = await cluster.stage(FakeCompute())

    for i in range(3):
        s = cluster.submit(stage.addr, payload(f"m{i}", gw_addr))
        assert await s.rest() == ["RECEIVED", "DONE"]

    assert metric(stage.runtime, "disagfusion_stage_requests_completed_total") == 3
    assert metric(stage.runtime, "disagfusion_stage_service_time_seconds_count") == 3
    assert metric(stage.runtime, "disagfusion_stage_queue_wait_seconds_count") == 3
    received = metric(stage.runtime, "disagfusion_handoff_bytes_total", direction="received")
    sent = metric(stage.runtime, "disagfusion_handoff_bytes_total", direction="sent")
    assert received == 3 * 16
    assert sent == 3 * 16
    assert metric(stage.runtime, "disagfusion_stage_in_flight") == 0
    assert metric(stage.runtime, "disagfusion_stage_ready") == 1
    assert len(gw.results) == 3


async def test_metrics_count_busy_rejections(cluster: Cluster) -> None:
    _, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute, overlap=False)

    a = cluster.submit(stage.addr, payload("A", gw_addr))
    assert status(await a.ack()) == "RECEIVED"
    b = cluster.submit(stage.addr, payload("B", gw_addr))
    assert status(await b.ack()) == "REJECTED"
    assert rejected(stage, "busy") == 1
    assert rejected(stage, "invalid") == 0
    assert metric(stage.runtime, "disagfusion_stage_in_flight") == 1
    compute.release("A")
    assert await a.rest() == ["DONE"]
    assert metric(stage.runtime, "disagfusion_stage_requests_completed_total") == 1


# ----------------------------------------------------------------------------- gateway

LIMITS = RequestLimits(
    served_model="fake-model",
    default_size=(64, 64),
    size_multiple=8,
    max_size=256,
    default_steps=10,
    default_guidance=7.5,
)
PNG = b"\x89PNG\r\n\x1a\nfake image "


class FakeFirstStage(pb_grpc.StageServicer):
    """A first stage that answers at once: `ok` sends PNGs to reply_to, `busy` refuses,
    `silent` takes the payload and never sends a result."""

    def __init__(self, channels: ChannelCache) -> None:
        self.mode = "ok"
        self.received: list[str] = []
        self._sender = Sender(ROLE, channels, HandoffMetrics(CollectorRegistry(), ROLE, PIPELINE))

    async def close(self) -> None:
        await self._sender.close()

    async def Health(self, request: pb.HealthRequest, context: object) -> pb.HealthReply:
        return pb.HealthReply(stage="encoder", ready=True, queue_capacity=4)

    async def Submit(
        self, request_iterator: AsyncIterator[pb.WorkChunk], context: object
    ) -> AsyncIterator[pb.Ack]:
        stream = request_iterator.__aiter__()
        header = (await stream.__anext__()).header
        rid = header.request_id
        if self.mode == "busy":
            yield pb.Ack(request_id=rid, status=pb.Ack.REJECTED, reason="busy", retryable=True)
            return
        await read_tensors(header, stream)
        self.received.append(rid)
        yield pb.Ack(request_id=rid, status=pb.Ack.RECEIVED)
        if self.mode == "ok":
            params = params_from_proto(header.params)
            await self._sender.hand_off(
                Payload(
                    request_id=rid,
                    params=params,
                    reply_to=header.reply_to,
                    source_stage=ROLE,
                    tensors={
                        f"png.{i}": torch.tensor(list(PNG + bytes([i])), dtype=torch.uint8)
                        for i in range(params.num_images)
                    },
                )
            )
        yield pb.Ack(request_id=rid, status=pb.Ack.DONE)


async def start_gateway(
    cluster: Cluster, first_stage_addr: str, **config: object
) -> tuple[Gateway, TestClient]:
    result_port = free_port()
    settings: dict[str, Any] = {"limits": LIMITS, **config}
    gateway = Gateway(
        GatewayConfig(
            model="fake-model",
            first_stage="encoder",
            stage_addrs={"encoder": [first_stage_addr]},
            result_address=f"{HOST}:{result_port}",
            pipeline=PIPELINE,
            **settings,
        )
    )
    await cluster.serve(gateway, result_port)
    gateway.start()
    client = TestClient(TestServer(build_http_app(gateway)))
    await client.start_server()
    cluster.closers += [gateway.stop, client.close]
    return gateway, client


async def fake_first_stage(cluster: Cluster) -> tuple[FakeFirstStage, str]:
    stage = FakeFirstStage(cluster.channels)
    cluster.closers.append(stage.close)
    return stage, await cluster.serve(stage)


def gateway_gauge(gateway: Gateway, name: str) -> float | None:
    return gateway.metrics.registry.get_sample_value(
        f"disagfusion_gateway_{name}_requests", {"pipeline": PIPELINE}
    )


async def ready(gateway: Gateway) -> None:
    await wait_until(lambda: gateway.readiness()[0], "gateway ready")


GENERATIONS = "/v1/images/generations"


async def test_gateway_returns_images_as_b64(cluster: Cluster) -> None:
    first, addr = await fake_first_stage(cluster)
    gateway, client = await start_gateway(cluster, addr)
    await ready(gateway)

    resp = await client.post(GENERATIONS, json={"prompt": "a cat", "n": 2, "seed": 7})
    body = await resp.json()
    assert resp.status == 200, body
    assert [base64.b64decode(d["b64_json"]) for d in body["data"]] == [PNG + b"\x00", PNG + b"\x01"]
    assert [d["seed"] for d in body["data"]] == [7, 8]  # each image's own seed
    assert resp.headers["X-Request-Id"] == first.received[0]


async def test_gateway_uses_the_clients_request_id(cluster: Cluster) -> None:
    first, addr = await fake_first_stage(cluster)
    gateway, client = await start_gateway(cluster, addr)
    await ready(gateway)

    for _ in range(2):  # a reused id is still two requests in the pipeline
        resp = await client.post(
            GENERATIONS, json={"prompt": "a cat"}, headers={"X-Request-Id": "trace-42"}
        )
        assert resp.status == 200, await resp.json()
        assert resp.headers["X-Request-Id"] == "trace-42"
    assert len(first.received) == 2 and len(set(first.received)) == 2
    assert all(rid.startswith("trace-42.") for rid in first.received)

    resp = await client.post(
        GENERATIONS, json={"prompt": "a cat"}, headers={"X-Request-Id": "bad id\twith tab"}
    )
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == "X-Request-Id", body
    assert resp.headers["X-Request-Id"]  # a fresh one, even on this error
    assert len(first.received) == 2


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/", 404, "not_found"),
        ("GET", "/v1/nope", 404, "not_found"),
        ("POST", "/v1/models", 405, "method_not_allowed"),
        ("GET", GENERATIONS, 405, "method_not_allowed"),
        ("GET", "/v1/models/other-model", 404, "model_not_found"),
    ],
)
async def test_every_error_is_openai_shaped_json_with_a_request_id(
    cluster: Cluster, method: str, path: str, status: int, code: str
) -> None:
    _, addr = await fake_first_stage(cluster)
    _, client = await start_gateway(cluster, addr)

    resp = await client.request(method, path)
    body = await resp.json()
    assert resp.status == status, body
    assert resp.content_type == "application/json"
    assert body["error"]["code"] == code and body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert resp.headers["X-Request-Id"]
    if status == 405:
        assert resp.headers["Allow"]


async def test_models_list_and_retrieve_by_id_or_alias(cluster: Cluster) -> None:
    _, addr = await fake_first_stage(cluster)
    limits = dataclasses.replace(LIMITS, model_aliases=("builtin:fake", "org/fake-model"))
    _, client = await start_gateway(cluster, addr, limits=limits)

    listing = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in listing["data"]] == ["fake-model"]
    card = listing["data"][0]
    assert card["object"] == "model" and isinstance(card["created"], int)
    for name in ("fake-model", "builtin:fake", "org/fake-model"):
        resp = await client.get(f"/v1/models/{name}")
        assert resp.status == 200 and (await resp.json()) == card


async def test_a_draining_gateway_refuses_new_requests_with_503_and_retry_after(
    cluster: Cluster,
) -> None:
    first, addr = await fake_first_stage(cluster)
    first.mode = "silent"
    gateway, client = await start_gateway(cluster, addr)
    await ready(gateway)
    accepted = asyncio.create_task(client.post(GENERATIONS, json={"prompt": "accepted"}))
    await wait_until(lambda: gateway.pending_count == 1, "request accepted")

    draining = asyncio.create_task(gateway.drain(timeout_s=0.3))
    await asyncio.sleep(0)
    resp = await client.post(GENERATIONS, json={"prompt": "late"})
    body = await resp.json()
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1, body
    assert "shutting down" in body["error"]["message"]
    assert (await client.get("/readyz")).status == 503

    assert await draining is False  # the accepted one never finished ...
    await gateway.stop()  # ... so it is answered explicitly
    resp = await asyncio.wait_for(accepted, WAIT_S)
    assert resp.status == 503, await resp.json()
    assert "shut down before this request finished" in (await resp.json())["error"]["message"]


async def test_a_stage_that_was_ready_and_restarts_still_admits_requests(cluster: Cluster) -> None:
    first, addr = await fake_first_stage(cluster)
    gateway, client = await start_gateway(cluster, addr)
    await ready(gateway)
    # The only first-stage instance goes away (a crashed worker being restarted).
    await cluster.servers[0].stop(0)
    await wait_until(lambda: not gateway.readiness()[0], "gateway sees the stage gone")
    waiting = asyncio.create_task(client.post(GENERATIONS, json={"prompt": "during restart"}))
    await wait_until(lambda: gateway.pending_count == 1, "request admitted, not refused")
    await cluster.serve(first, int(addr.rsplit(":", 1)[1]))  # back on the same port
    resp = await asyncio.wait_for(waiting, WAIT_S * 2)
    assert resp.status == 200, await resp.json()


async def test_gateway_answers_429_with_retry_after_when_the_pipeline_is_full(
    cluster: Cluster,
) -> None:
    first, addr = await fake_first_stage(cluster)
    first.mode = "busy"
    gateway, client = await start_gateway(cluster, addr, max_waiting=1)
    await ready(gateway)

    waiting = asyncio.create_task(client.post(GENERATIONS, json={"prompt": "first"}))
    await wait_until(lambda: gateway_gauge(gateway, "waiting") == 1, "first request waiting")
    resp = await client.post(GENERATIONS, json={"prompt": "second"})
    body = await resp.json()
    assert resp.status == 429, body
    assert int(resp.headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "pipeline_full"
    assert body["error"]["type"] == "rate_limit_error"

    # The waiting request was kept, not dropped: it completes once the stage has room.
    first.mode = "ok"
    resp = await asyncio.wait_for(waiting, WAIT_S)
    assert resp.status == 200, await resp.json()


async def test_gateway_answers_503_when_no_first_stage_instance_is_ready(
    cluster: Cluster,
) -> None:
    _, client = await start_gateway(cluster, f"{HOST}:{free_port()}")  # nobody listens there

    resp = await client.post(GENERATIONS, json={"prompt": "a cat"})
    body = await resp.json()
    assert resp.status == 503, body
    assert body["error"]["code"] == "not_ready"
    assert "encoder" in body["error"]["message"]
    ready_resp = await client.get("/readyz")
    assert ready_resp.status == 503


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}],
    ids=["missing", "wrong-key", "not-bearer"],
)
async def test_gateway_requires_the_api_key(cluster: Cluster, headers: dict[str, str]) -> None:
    first, addr = await fake_first_stage(cluster)
    gateway, client = await start_gateway(cluster, addr, api_key="secret")
    await ready(gateway)

    resp = await client.post(GENERATIONS, json={"prompt": "a cat"}, headers=headers)
    body = await resp.json()
    assert resp.status == 401, body
    assert body["error"]["code"] == "invalid_api_key"
    assert first.received == []

    resp = await client.post(
        GENERATIONS, json={"prompt": "a cat"}, headers={"Authorization": "Bearer secret"}
    )
    assert resp.status == 200, await resp.json()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{not json", "invalid_json"),
        (b'["a cat"]', "invalid_json"),
        (b"{}", "missing_field"),
        (b'{"prompt": "a cat", "size": "13x13"}', None),
    ],
    ids=["not-json", "not-an-object", "no-prompt", "bad-size"],
)
async def test_gateway_answers_400_for_a_bad_body(
    cluster: Cluster, data: bytes, code: str | None
) -> None:
    first, addr = await fake_first_stage(cluster)
    gateway, client = await start_gateway(cluster, addr)
    await ready(gateway)

    resp = await client.post(GENERATIONS, data=data, headers={"Content-Type": "application/json"})
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["type"] == "invalid_request_error"
    if code is not None:
        assert body["error"]["code"] == code
    assert first.received == []


async def test_gateway_answers_504_when_no_result_arrives_in_time(cluster: Cluster) -> None:
    first, addr = await fake_first_stage(cluster)
    first.mode = "silent"
    gateway, client = await start_gateway(cluster, addr, request_timeout_s=0.05)
    await ready(gateway)

    resp = await client.post(GENERATIONS, json={"prompt": "a cat"})
    body = await resp.json()
    assert resp.status == 504, body
    assert body["error"]["code"] == "deadline_exceeded"
    assert len(first.received) == 1
    assert gateway_gauge(gateway, "pending") == 0
