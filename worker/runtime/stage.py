"""The stage runtime shared by every stage: receive, compute and send concurrently.

Three activities run at once inside a worker, joined by bounded queues:
the gRPC Submit handler receives payloads into the inbox, one compute loop
runs the model on them, and sender loops hand the outputs downstream. With
overlap off (`overlap=False`) the worker takes one request at a time and hands
its output off before it accepts the next: the synchronous baseline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import grpc
import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.metrics import StageMetrics
from disagfusion.worker.params import GenerationParams, WorkerRole
from disagfusion.worker.progress import RequestCancelled
from disagfusion.worker.runtime.aio import cancel_all
from disagfusion.worker.runtime.payload import (
    Payload,
    PayloadError,
    payload_from,
    read_header,
)
from disagfusion.worker.runtime.peers import ChannelCache, PeerPool
from disagfusion.worker.runtime.progress import ProgressReporter
from disagfusion.worker.runtime.sender import DeliveryFailed, HandoffDelay, Sender
from disagfusion.worker.transport.base import DescriptorError, NotAccepted, TransferError
from disagfusion.worker.transport.inline_wire import add_stage_servicer
from disagfusion.worker.transport.wire import Transports, accept, fetch_tensors

log = logging.getLogger(__name__)

# Request ids remembered after completion, so a retried duplicate is answered
# DONE instead of being computed twice.
FINISHED_MEMORY = 10_000


@dataclass
class RuntimeConfig:
    role: WorkerRole
    model: str
    pipeline: str = "local"
    next_addrs: list[str] = field(default_factory=list)  # empty: send to reply_to
    queue_capacity: int = 2
    outbox_capacity: int = 2
    overlap: bool = True
    handoff_delay: HandoffDelay = field(default_factory=HandoffDelay)
    drain_timeout_s: float = 120.0
    transport: str = "grpc"  # sends with it where the receiver accepts it; accepts it and grpc
    transport_options: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"  # where fetched tensors land, when the transport can put them there

    @property
    def terminal(self) -> bool:
        """The last hop: outputs go back to the gateway named in each payload."""
        return not self.next_addrs


@dataclass
class _Entry:
    payload: Payload
    released: asyncio.Future[None]
    received_at: float
    queued: bool = True
    abandoned: bool = False  # its bytes never fully arrived


ComputeFn = Callable[[GenerationParams, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class StageRuntime(pb_grpc.StageServicer):
    """One stage worker's data plane, independent of which model it runs."""

    def __init__(
        self,
        config: RuntimeConfig,
        input_error: type[Exception] = ValueError,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = StageMetrics(config.role, config.pipeline, config.model)
        self.metrics.queue_capacity.set(config.queue_capacity)
        self._input_error = input_error
        self._clock = clock
        self._compute: ComputeFn | None = None
        self._progress: ProgressReporter | None = None  # made on the loop, at the first request
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._entries: dict[str, _Entry] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._inbox: asyncio.Queue[_Entry] = asyncio.Queue()
        self._outbox: asyncio.Queue[tuple[_Entry, Payload]] = asyncio.Queue(
            maxsize=max(config.outbox_capacity, 1)
        )
        self._channels = ChannelCache()
        self.transports = Transports.open(config.transport, config.transport_options, config.device)
        self._pool = (
            PeerPool(
                f"after-{config.role}",
                config.next_addrs,
                self._channels,
                on_gone=self.transports.forget,
            )
            if config.next_addrs
            else None
        )
        self._sender = Sender(
            config.role,
            self._channels,
            self.metrics.handoff,
            pool=self._pool,
            delay=config.handoff_delay,
            on_failure=self._report_failure,
            clock=clock,
            transports=self.transports,
        )
        # Terminal errors go straight to the gateway (reply_to), never through later stages.
        self._reply_sender = Sender(
            config.role,
            self._channels,
            self.metrics.handoff,
            clock=clock,
            transports=self.transports,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.accepting = False
        self.draining = False
        self._service_ewma = 0.0
        self._completed = 0

    # ---- lifecycle -------------------------------------------------------

    def start(self) -> None:
        if self._pool is not None:
            self._pool.start()
        self._tasks.append(asyncio.create_task(self._compute_loop()))
        if self.config.overlap:
            for _ in range(max(self.config.outbox_capacity, 1)):
                self._tasks.append(asyncio.create_task(self._send_loop()))

    async def load(self, factory: Callable[[], ComputeFn]) -> None:
        """Load the model off the event loop, then start accepting work."""
        self._compute = await asyncio.get_running_loop().run_in_executor(self._executor, factory)
        self.accepting = True
        self.metrics.ready.set(1)
        log.info("%s ready", self.config.role)

    @property
    def ready(self) -> bool:
        return self.accepting and not self.draining

    async def drain(self) -> bool:
        """Stop accepting, finish and hand off everything held. False on timeout."""
        self.draining = True
        self.metrics.ready.set(0)
        deadline = time.monotonic() + self.config.drain_timeout_s
        while self._entries and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        remaining = max(0.0, deadline - time.monotonic())
        done = await self._sender.drain(remaining) and await self._reply_sender.drain(remaining)
        return done and not self._entries

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        await self._sender.close()
        await self._reply_sender.close()
        if self._pool is not None:
            await self._pool.stop()
        await self._channels.close()
        await self.transports.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- admission ------------------------------------------------------

    def _queued(self) -> int:
        return sum(1 for e in self._entries.values() if e.queued)

    def _has_room(self) -> bool:
        if not self.config.overlap:
            return not self._entries
        held_limit = self.config.queue_capacity + 1 + self.config.outbox_capacity
        return self._queued() < self.config.queue_capacity and len(self._entries) < held_limit

    def _ack(
        self,
        request_id: str,
        status: pb.Ack.Status,
        reason: str = "",
        retryable: bool = False,
    ) -> pb.Ack:
        return pb.Ack(
            request_id=request_id,
            status=status,
            reason=reason,
            retryable=retryable,
            queue_depth=self._queued(),
            in_flight=len(self._entries),
        )

    def _refresh_gauges(self) -> None:
        self.metrics.queue_depth.set(self._queued())
        self.metrics.in_flight.set(len(self._entries))
        self.metrics.outbox_depth.set(self._outbox.qsize())

    # ---- gRPC service ---------------------------------------------------

    async def Health(self, request: pb.HealthRequest, context: object) -> pb.HealthReply:
        reply = pb.HealthReply(
            stage=self.config.role,
            model=self.config.model,
            ready=self.ready,
            draining=self.draining,
            queue_depth=self._queued(),
            in_flight=len(self._entries),
            queue_capacity=self.config.queue_capacity if self.config.overlap else 1,
            outbox_depth=self._outbox.qsize(),
            service_time_ewma_s=self._service_ewma,
            completed_total=self._completed,
        )
        return self.transports.advertise(reply)

    async def Submit(
        self, request_iterator: AsyncIterator[pb.WorkChunk], context: object
    ) -> AsyncIterator[pb.Ack]:
        started = time.perf_counter()
        stream = request_iterator.__aiter__()
        try:
            header = await read_header(stream)
        except PayloadError as err:
            self.metrics.reject("invalid")
            yield self._ack("", pb.Ack.REJECTED, f"invalid payload: {err}")
            return
        rid = header.request_id
        if rid in self._finished:
            self.metrics.duplicates.inc()
            yield self._ack(rid, pb.Ack.RECEIVED)
            yield self._ack(rid, pb.Ack.DONE)
            return
        existing = self._entries.get(rid)
        if existing is not None:
            # A retry of something we hold: join it instead of computing twice.
            self.metrics.duplicates.inc()
            yield self._ack(rid, pb.Ack.RECEIVED)
            await asyncio.shield(existing.released)
            if existing.abandoned:
                return  # the copy it joined never arrived: no DONE, so its sender retries
            yield self._ack(rid, pb.Ack.DONE)
            return
        if not self.ready or not self._has_room():
            reason = "busy" if self.ready else ("draining" if self.draining else "loading")
            self.metrics.reject(reason)
            yield self._ack(rid, pb.Ack.REJECTED, reason, retryable=True)
            return
        # Reserve the slot before reading the bytes so concurrent senders see it taken.
        entry = _Entry(
            payload=payload_from(header, {}),
            released=asyncio.get_running_loop().create_future(),
            received_at=time.perf_counter(),
        )
        self._entries[rid] = entry
        self._refresh_gauges()
        try:
            backend = accept(self.transports, header)
            if backend.pushes:
                yield self._ack(rid, pb.Ack.FETCHING)
            entry.payload.tensors = await fetch_tensors(backend, header, stream)
        except NotAccepted as err:
            self._abandon(entry)  # the sender asks Health again and sends what we take
            self.metrics.reject("transport")
            yield self._ack(rid, pb.Ack.REJECTED, str(err), retryable=True)
            return
        except DescriptorError as err:
            self._abandon(entry)
            self.metrics.reject("invalid")
            yield self._ack(rid, pb.Ack.REJECTED, f"invalid payload: {err}")
            return
        except TransferError as err:
            # The bytes did not arrive (sender gone, segment released): it may try again.
            self._abandon(entry)
            self.metrics.reject("transfer")
            yield self._ack(rid, pb.Ack.REJECTED, f"transfer failed: {err}", retryable=True)
            return
        except BaseException:
            self._abandon(entry)  # the sender went away mid-stream; it still holds the payload
            raise
        self.metrics.handoff.received(
            entry.payload.nbytes, time.perf_counter() - started, backend.name
        )
        entry.received_at = time.perf_counter()
        self._inbox.put_nowait(entry)
        yield self._ack(rid, pb.Ack.RECEIVED)
        await asyncio.shield(entry.released)
        yield self._ack(rid, pb.Ack.DONE)

    # ---- compute and hand-off -------------------------------------------

    async def _compute_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            entry = await self._inbox.get()
            entry.queued = False
            self._refresh_gauges()
            payload = entry.payload
            if payload.deadline_unix and self._clock() > payload.deadline_unix:
                await self._fail(entry, 504, f"deadline passed before {self.config.role} started")
                continue
            self.metrics.queue_wait.observe(time.perf_counter() - entry.received_at)
            assert self._compute is not None
            self.metrics.busy.set(1)
            t0 = time.perf_counter()
            if self._progress is None:
                self._progress = ProgressReporter(self.config.role, self._channels, loop)
            context = self._progress.bind(payload)
            try:
                outputs = await loop.run_in_executor(
                    self._executor, context.run, self._compute, payload.params, payload.tensors
                )
            except RequestCancelled as err:
                # Nobody waits for it: no result, no error; custody is released.
                log.info("%s dropped %s: %s", self.config.role, payload.request_id, err)
                self.metrics.fail("cancelled")
                self._release(entry)
                continue
            except self._input_error as err:
                await self._fail(entry, 400, f"{self.config.role}: {err}")
                continue
            except Exception as err:
                log.exception("%s failed on %s", self.config.role, payload.request_id)
                await self._fail(entry, 500, f"{self.config.role} failed: {err}")
                continue
            finally:
                self.metrics.busy.set(0)
                self._progress.forget(payload.request_id)
            elapsed = time.perf_counter() - t0
            self.metrics.service_time.observe(elapsed)
            self._service_ewma = (
                elapsed if not self._service_ewma else (0.8 * self._service_ewma + 0.2 * elapsed)
            )
            out = replace(payload, tensors=outputs, source_stage=self.config.role)
            if self.config.overlap:
                await self._outbox.put((entry, out))
                self._refresh_gauges()
            else:
                await self._forward(entry, out)

    async def _send_loop(self) -> None:
        while True:
            entry, out = await self._outbox.get()
            self._refresh_gauges()
            await self._forward(entry, out)

    async def _forward(self, entry: _Entry, out: Payload) -> None:
        sender = self._reply_sender if self.config.terminal else self._sender
        try:
            await sender.hand_off(out)
        except DeliveryFailed as failure:
            await self._fail(entry, failure.code, failure.message)
            return
        self._completed += 1
        self.metrics.completed.inc()
        self._release(entry)

    async def _fail(self, entry: _Entry, code: int, message: str) -> None:
        reason = {400: "bad_input", 504: "deadline"}.get(code, "error")
        self.metrics.fail(reason)
        await self._report_failure(entry.payload, code, message)
        self._release(entry)

    async def _report_failure(self, payload: Payload, code: int, message: str) -> None:
        """Tell the gateway that owns the request that it ended with an error."""
        log.warning("request %s failed (%d): %s", payload.request_id, code, message)
        error = payload.failed(code, message, self.config.role)
        # Give the error until a little past the request deadline to reach the gateway.
        error.deadline_unix = max(payload.deadline_unix, self._clock()) + 30.0
        try:
            await self._reply_sender.hand_off(error)
        except DeliveryFailed as failure:
            log.error("could not report failure of %s: %s", payload.request_id, failure)

    def _release(self, entry: _Entry) -> None:
        rid = entry.payload.request_id
        if not entry.released.done():
            entry.released.set_result(None)
        self._forget(rid)
        self._finished[rid] = None
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _abandon(self, entry: _Entry) -> None:
        """Drop an entry whose bytes never fully arrived, and end duplicates that joined it."""
        entry.abandoned = True
        if not entry.released.done():
            entry.released.set_result(None)
        self._forget(entry.payload.request_id)

    def _forget(self, rid: str) -> None:
        self._entries.pop(rid, None)
        self._refresh_gauges()


async def start_grpc_server(
    servicer: pb_grpc.StageServicer, host: str, port: int
) -> grpc.aio.Server:
    from disagfusion.worker.runtime.peers import SERVER_OPTIONS

    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_stage_servicer(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    return server
