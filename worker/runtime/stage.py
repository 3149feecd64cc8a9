"""The stage runtime shared by every stage: receive, compute and send concurrently.

Three activities run at once inside a worker, joined by bounded queues:
the gRPC Submit handler receives payloads into the inbox, one compute loop
runs the model on them, and sender loops hand the outputs downstream. With
overlap off (`overlap=False`) the worker takes one request at a time and hands
its output off before it accepts the next: the synchronous baseline.

The inbox is served in the configured order (scheduling/queue_order.py: FIFO,
or earliest SLO deadline first) and in batches: the head and up to
max_batch - 1 queued requests with its batch key share one pipeline call
(waiting up to batch_wait_s for them when asked; by default only what is
already queued, so batching never adds idle time). Each request keeps its own
result, error, deadline and custody.
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

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.scheduling.queue_order import DEFAULT_AGING_S, OrderedQueue
from disagfusion.worker.metrics import StageMetrics
from disagfusion.worker.params import WorkerRole
from disagfusion.worker.progress import RequestCancelled
from disagfusion.worker.runtime.aio import cancel_all
from disagfusion.worker.runtime.batching import (
    BatchCompute,
    ComputeFn,
    Outcome,
    as_batch_compute,
    input_bound,
)
from disagfusion.worker.runtime.payload import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Payload,
    PayloadError,
    payload_from,
    read_header,
)
from disagfusion.worker.runtime.peers import ChannelCache, PeerPool
from disagfusion.worker.runtime.progress import ProgressReporter
from disagfusion.worker.runtime.sender import DeliveryFailed, HandoffDelay, Sender
from disagfusion.worker.runtime.senders import upstream_of
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
    max_batch: int | None = None  # requests per pipeline call; None: the model's default
    batch_wait_s: float = 0.0  # how long a batch's head waits for more; 0: only what is queued
    queue_order: str = "fifo"  # or "edf": earliest SLO deadline first
    queue_aging_s: float = DEFAULT_AGING_S  # EDF: no request waits longer behind later ones
    # Emulated slower accelerator (tests, local runs): every call takes this many
    # times its compute time; the stage is held busy meanwhile, as on a slow device.
    slowdown: float = 1.0
    # A payload declaring more tensor bytes is refused before anything is allocated.
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES

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
    cancelled: bool = False  # the gateway no longer wants it (Cancel)


__all__ = ["ComputeFn", "RuntimeConfig", "StageRuntime", "start_grpc_server"]


class StageRuntime(pb_grpc.StageServicer):
    """One stage worker's data plane, independent of which model it runs."""

    def __init__(
        self,
        config: RuntimeConfig,
        input_error: type[Exception] = ValueError,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.metrics = StageMetrics(config.role, config.pipeline, config.model, config.queue_order)
        self.metrics.queue_capacity.set(config.queue_capacity)
        self._input_error = input_error
        self._clock = clock
        self._compute: BatchCompute | None = None
        self._max_batch = 1  # set when the model is loaded
        self._room = config.queue_capacity  # queued payloads before refusing: >= one batch
        self.max_payload_bytes = config.max_payload_bytes  # tightened to the model's at load
        self._progress: ProgressReporter | None = None  # made on the loop, at the first request
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._entries: dict[str, _Entry] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._inbox: OrderedQueue[_Entry] = OrderedQueue(config.queue_order, config.queue_aging_s)
        self._inbox_changed = asyncio.Event()
        # Unbounded: a batch's outputs go in at once; compute waits for room after.
        self._outbox: asyncio.Queue[tuple[_Entry, Payload]] = asyncio.Queue()
        self._outbox_room = asyncio.Event()
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
        self._add_senders(self._outbox_capacity)

    def _add_senders(self, count: int) -> None:
        if not self.config.overlap:
            return
        while sum(1 for t in self._tasks if t.get_name() == "send") < count:
            self._tasks.append(asyncio.create_task(self._send_loop(), name="send"))

    @property
    def _outbox_capacity(self) -> int:
        # A batch's outputs are handed on side by side, not one after another.
        return max(self.config.outbox_capacity, self._max_batch, 1)

    async def load(self, factory: Callable[[], BatchCompute | ComputeFn]) -> None:
        """Load the model off the event loop, then start accepting work."""
        loaded = await asyncio.get_running_loop().run_in_executor(self._executor, factory)
        self._compute = as_batch_compute(loaded)
        chosen = self.config.max_batch or self._compute.default_max_batch()
        self._max_batch = max(1, chosen) if self.config.overlap else 1
        self._room = max(self.config.queue_capacity, self._max_batch)
        bound = input_bound(loaded)
        if bound is not None:
            self.max_payload_bytes = min(self.config.max_payload_bytes, bound)
        log.info("%s takes payloads of at most %s", self.config.role, _size(self.max_payload_bytes))
        self.metrics.max_batch.set(self._max_batch)
        self.metrics.queue_capacity.set(self._room)
        self._add_senders(self._outbox_capacity)
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
        held_limit = self._room + self._max_batch + self._outbox_capacity
        return self._queued() < self._room and len(self._entries) < held_limit

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
            queue_capacity=self._room if self.config.overlap else 1,
            outbox_depth=self._outbox.qsize(),
            service_time_ewma_s=self._service_ewma,
            completed_total=self._completed,
        )
        return self.transports.advertise(reply)

    async def Cancel(self, request: pb.CancelRequest, context: object) -> pb.CancelReply:
        """The gateway gave up on a request: drop it from the queue, stop computing it at
        the next step, and skip it should it arrive later (acknowledged, not computed)."""
        rid = request.request_id
        entry = self._entries.get(rid)
        self._remember_finished(rid)
        if entry is None:
            return pb.CancelReply(held=False)
        entry.cancelled = True
        if entry.queued and self._inbox.remove(entry):
            entry.queued = False
            self._drop(entry, "cancelled while queued")
        elif self._progress is not None:
            self._progress.cancel(rid)  # computing: the step callback stops it
        return pb.CancelReply(held=True)

    async def Submit(
        self, request_iterator: AsyncIterator[pb.WorkChunk], context: object
    ) -> AsyncIterator[pb.Ack]:
        started = time.perf_counter()
        stream = request_iterator.__aiter__()
        try:
            header = await read_header(stream, self.max_payload_bytes)
        except PayloadError as err:
            self.metrics.reject("invalid")
            yield self._ack("", pb.Ack.REJECTED, f"invalid payload: {err}")
            return
        rid = header.request_id
        upstream = upstream_of(self.config.role)
        if header.source_stage != upstream:
            self.metrics.reject("sender")
            reason = f"{self.config.role} takes work only from {upstream}"
            yield self._ack(rid, pb.Ack.REJECTED, f"{reason}, not {header.source_stage!r}")
            return
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
        self._enqueue(entry)
        yield self._ack(rid, pb.Ack.RECEIVED)
        await asyncio.shield(entry.released)
        yield self._ack(rid, pb.Ack.DONE)

    # ---- compute and hand-off -------------------------------------------

    def _enqueue(self, entry: _Entry) -> None:
        payload = entry.payload
        assert self._compute is not None
        try:
            key = self._compute.batch_key(payload.params, payload.tensors)
        except Exception:  # an odd request is simply not batched; compute reports it
            key = None
        self._inbox.push(
            entry,
            arrival=self._clock(),
            deadline=payload.slo_deadline_unix or None,
            key=key,
        )
        self._inbox_changed.set()

    async def _next_batch(self) -> list[_Entry]:
        """The head of the inbox and what may share its call."""
        while not self._inbox:
            self._inbox_changed.clear()
            await self._inbox_changed.wait()
        wait_s = self.config.batch_wait_s
        if self._max_batch > 1 and wait_s > 0 and len(self._inbox) < self._max_batch:
            started = time.perf_counter()
            deadline = started + wait_s
            while len(self._inbox) < self._max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._inbox_changed.clear()
                try:
                    await asyncio.wait_for(self._inbox_changed.wait(), left)
                except TimeoutError:
                    break
            self.metrics.batch_wait.observe(time.perf_counter() - started)
        return self._inbox.pop_batch(self._max_batch)

    async def _compute_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            for entry in batch:
                entry.queued = False
            self._refresh_gauges()
            live = []
            for entry in batch:
                if entry.cancelled:  # cancelled while its bytes were still arriving
                    self._drop(entry, "cancelled before it started")
                    continue
                if entry.payload.deadline_unix and self._clock() > entry.payload.deadline_unix:
                    await self._fail(
                        entry, 504, f"deadline passed before {self.config.role} started"
                    )
                    continue
                self.metrics.queue_wait.observe(time.perf_counter() - entry.received_at)
                live.append(entry)
            if live:
                await self._compute_batch(live)
            while self.config.overlap and self._outbox.qsize() >= self._outbox_capacity:
                self._outbox_room.clear()
                await self._outbox_room.wait()

    async def _compute_batch(self, batch: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        assert self._compute is not None
        if self._progress is None:
            self._progress = ProgressReporter(self.config.role, self._channels, loop)
        progress = self._progress
        payloads = [entry.payload for entry in batch]
        context = progress.bind(*payloads)
        requests = [(p.params, p.tensors) for p in payloads]
        self.metrics.batch_size.observe(len(batch))
        self.metrics.busy.set(1)
        t0 = time.perf_counter()
        try:
            outcomes: list[Outcome] = await loop.run_in_executor(
                self._executor, context.run, self._compute.run_batch, requests
            )
        except Exception as err:  # the call itself broke: every request ends with it
            outcomes = [err] * len(batch)
        finally:
            if self.config.slowdown > 1:
                await asyncio.sleep((time.perf_counter() - t0) * (self.config.slowdown - 1))
            self.metrics.busy.set(0)
        elapsed = time.perf_counter() - t0
        if len(outcomes) != len(batch):
            outcomes = [RuntimeError("the model answered for the wrong number of requests")] * len(
                batch
            )
        # The call's time is shared by its requests: per-request service time is
        # what capacity and dispatch are computed from.
        share = elapsed / len(batch)
        for entry, outcome in zip(batch, outcomes, strict=True):
            rid = entry.payload.request_id
            cancelled = progress.cancelled(rid) or entry.cancelled
            progress.forget(rid)
            if cancelled or isinstance(outcome, RequestCancelled):
                # Nobody waits for it: no result, no error; custody is released.
                why = outcome if isinstance(outcome, Exception) else "cancelled during its batch"
                self._drop(entry, str(why))
                continue
            if isinstance(outcome, self._input_error):
                await self._fail(entry, 400, f"{self.config.role}: {outcome}")
                continue
            if isinstance(outcome, Exception):
                log.error("%s failed on %s", self.config.role, rid, exc_info=outcome)
                await self._fail(entry, 500, f"{self.config.role} failed: {outcome}")
                continue
            self.metrics.service_time.observe(share)
            self._service_ewma = (
                share if not self._service_ewma else (0.8 * self._service_ewma + 0.2 * share)
            )
            out = replace(entry.payload, tensors=outcome, source_stage=self.config.role)
            if self.config.overlap:
                self._outbox.put_nowait((entry, out))
                self._refresh_gauges()
            else:
                await self._forward(entry, out)

    async def _send_loop(self) -> None:
        while True:
            entry, out = await self._outbox.get()
            self._outbox_room.set()
            self._refresh_gauges()
            await self._forward(entry, out)

    async def _forward(self, entry: _Entry, out: Payload) -> None:
        if entry.cancelled:
            self._drop(entry, "cancelled before its hand-off")
            return
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

    def _drop(self, entry: _Entry, why: str) -> None:
        """Nobody waits for it: no result, no error; custody is released."""
        log.info("%s dropped %s: %s", self.config.role, entry.payload.request_id, why)
        self.metrics.fail("cancelled")
        self._release(entry)

    def _release(self, entry: _Entry) -> None:
        rid = entry.payload.request_id
        if not entry.released.done():
            entry.released.set_result(None)
        self._forget(rid)
        self._remember_finished(rid)

    def _remember_finished(self, rid: str) -> None:
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


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"
