"""The in-process data plane harness: real gRPC servers on 127.0.0.1, fake compute,
fake gateway (tests/worker/conftest.py provides it as the `cluster` fixture).

Compute runs in the runtime's thread executor, so a fake compute that blocks on
a threading.Event holds a request "computing" until the test releases it;
everything else is observed by polling with a bounded wait, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.local.launcher import free_port as launcher_free_port
from disagfusion.worker.metrics import HandoffMetrics
from disagfusion.worker.params import GenerationParams, WorkerRole
from disagfusion.worker.runtime.payload import (
    Payload,
    data_chunks,
    header_of,
    payload_from,
    read_tensors,
)
from disagfusion.worker.runtime.peers import ChannelCache, PeerPool
from disagfusion.worker.runtime.sender import Sender
from disagfusion.worker.runtime.stage import RuntimeConfig, StageRuntime, start_grpc_server
from disagfusion.worker.transport.wire import Transports

HOST = "127.0.0.1"
WAIT_S = 10.0
PIPELINE = "test"
ROLE: WorkerRole = "decoder"

# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A port nobody in this process has used yet (the launcher's rule: below the
    ephemeral range, so no outgoing connection takes it before the bind)."""
    return launcher_free_port(HOST)


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
        transport: str = "grpc",
        transport_options: dict[str, str] | None = None,
        max_batch: int | None = None,
        batch_wait_s: float = 0.0,
        queue_order: str = "fifo",
        clock: Callable[[], float] = time.time,
    ) -> Stage:
        runtime = StageRuntime(
            RuntimeConfig(
                role=ROLE,
                model="fake",
                pipeline=PIPELINE,
                queue_capacity=queue_capacity,
                overlap=overlap,
                drain_timeout_s=WAIT_S,
                transport=transport,
                transport_options=transport_options or {},
                max_batch=max_batch,
                batch_wait_s=batch_wait_s,
                queue_order=queue_order,
            ),
            clock=clock,
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

    def sender(
        self,
        addrs: list[str],
        transports: Transports | None = None,
        metrics: HandoffMetrics | None = None,
    ) -> tuple[Sender, PeerPool]:
        pool = PeerPool("next", addrs, self.channels, poll_interval_s=0.05)
        pool.start()
        sender = Sender(
            "upstream",
            self.channels,
            metrics or HandoffMetrics(CollectorRegistry(), "upstream", PIPELINE),
            pool=pool,
            transports=transports,
        )
        self.closers += [sender.close, pool.stop]
        if transports is not None:
            self.closers.append(transports.close)
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
