"""Hand-off with custody: send a payload downstream and keep it until DONE.

`hand_off` returns once an instance has RECEIVED the payload (so the caller's
own upstream can be released); a background task keeps the stream open until
the instance answers DONE, and if the stream breaks first (the instance died)
it hands the payload to another instance. Duplicates that this may create are
suppressed downstream by request id.

The tensor bytes go by the process's transport where the receiver accepts it
(grpc otherwise, counted as a fallback); whatever an attempt published is
released when the attempt ends, since the custody copy is the payload itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

import grpc

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.metrics import HandoffMetrics
from disagfusion.worker.runtime.aio import cancel_all, raise_if_cancelled
from disagfusion.worker.runtime.payload import Payload, header_of
from disagfusion.worker.runtime.peers import ChannelCache, PeerPool
from disagfusion.worker.transport.base import Backend, Outgoing, Peer, TransferError
from disagfusion.worker.transport.wire import Transports, peer_from_health, write_payload

log = logging.getLogger(__name__)

# How long to wait before trying again when every instance refused or is down.
RETRY_BACKOFF_S = 0.05
MAX_BACKOFF_S = 1.0
# How long a reply_to address's advertised transports are trusted before asking again.
REPLY_PEER_TTL_S = 30.0
REPLY_HEALTH_TIMEOUT_S = 5.0


class DeliveryFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class HandoffDelay:
    """Emulated network time per hand-off (benchmarks): base plus uniform jitter."""

    base_s: float = 0.0
    jitter_s: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.base_s <= 0 and self.jitter_s <= 0:
            return 0.0
        return max(0.0, self.base_s + rng.uniform(-self.jitter_s, self.jitter_s))


class _Outcome(Enum):
    DONE = "done"
    BUSY = "busy"
    INVALID = "invalid"
    BROKEN = "broken"


FailureHandler = Callable[[Payload, int, str], Awaitable[None]]


class Sender:
    """Sends payloads to a stage pool (least loaded) or to each payload's reply_to."""

    def __init__(
        self,
        stage: str,
        channels: ChannelCache,
        metrics: HandoffMetrics,
        pool: PeerPool | None = None,
        delay: HandoffDelay = HandoffDelay(),
        on_failure: FailureHandler | None = None,
        clock: Callable[[], float] = time.time,
        transports: Transports | None = None,
    ) -> None:
        self.stage = stage
        self._transports = transports or Transports.open("grpc")
        self._reply_peers: dict[str, tuple[float, Peer]] = {}
        self._channels = channels
        self._metrics = metrics
        self._pool = pool
        self._delay = delay
        self._on_failure = on_failure
        self._clock = clock
        self._rng = random.Random()
        self._custody: set[asyncio.Task[None]] = set()

    @property
    def held(self) -> int:
        """Payloads received downstream but not yet DONE there (kept for retry)."""
        return len(self._custody)

    async def hand_off(self, payload: Payload) -> None:
        """Return once a downstream instance RECEIVED the payload.

        Raises DeliveryFailed when it cannot be delivered (deadline passed, or
        the receiver says the payload is invalid).
        """
        received: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._deliver(payload, received))
        self._custody.add(task)
        task.add_done_callback(self._custody.discard)
        await received

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every held payload is DONE downstream; False on timeout."""
        if not self._custody:
            return True
        _, pending = await asyncio.wait(set(self._custody), timeout=timeout_s)
        return not pending

    async def close(self) -> None:
        await cancel_all(self._custody)

    async def _deliver(self, payload: Payload, received: asyncio.Future[None]) -> None:
        try:
            await self._deliver_until_done(payload, received)
        except DeliveryFailed as failure:
            if not received.done():
                received.set_exception(failure)
            elif self._on_failure is not None:
                # The caller has moved on: the request still must end explicitly.
                await self._on_failure(payload, failure.code, failure.message)
            else:
                log.error("request %s lost after hand-off: %s", payload.request_id, failure)

    async def _deliver_until_done(self, payload: Payload, received: asyncio.Future[None]) -> None:
        refused: set[str] = set()
        backoff = RETRY_BACKOFF_S
        while True:
            if payload.deadline_unix and self._clock() > payload.deadline_unix:
                raise DeliveryFailed(504, f"deadline passed while {self.stage} was handing off")
            address = self._target(payload, refused)
            if address is None:
                # Every instance refused or is down: wait for a load report.
                refused.clear()
                if self._pool is not None:
                    await self._pool.wait_for_change(backoff)
                else:
                    await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            outcome, reason = await self._attempt(address, payload, received)
            if outcome is _Outcome.DONE:
                return
            raise_if_cancelled()  # close() must end this loop even if grpc absorbed the cancel
            if outcome is _Outcome.INVALID:
                raise DeliveryFailed(500, f"{address} refused the payload: {reason}")
            self._metrics.retry("busy" if outcome is _Outcome.BUSY else "unavailable")
            refused.add(address)
            if outcome is _Outcome.BROKEN:
                if self._pool is not None:
                    self._pool.mark_unhealthy(address)
                else:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    refused.clear()

    def _target(self, payload: Payload, refused: set[str]) -> str | None:
        if self._pool is None:
            return None if payload.reply_to in refused else payload.reply_to
        return self._pool.pick(refused)

    async def _peer(self, address: str) -> Peer:
        """What `address` accepts: from the pool's health polls, or for a
        reply_to address (no pool) from one Health call, cached."""
        if self._pool is not None:
            return self._pool.peer(address)
        if self._transports.preferred.name == "grpc":
            return Peer(address)
        cached = self._reply_peers.get(address)
        now = time.monotonic()
        if cached is not None and now - cached[0] < REPLY_PEER_TTL_S:
            return cached[1]
        try:
            reply = await self._channels.stub(address).Health(
                pb.HealthRequest(), timeout=REPLY_HEALTH_TIMEOUT_S
            )
        except grpc.aio.AioRpcError:
            raise_if_cancelled()
            return Peer(address)  # grpc for now; asked again next time, not cached
        peer = peer_from_health(address, reply)
        self._reply_peers[address] = (now, peer)
        return peer

    async def _publish(self, address: str, payload: Payload) -> tuple[Backend, Outgoing]:
        peer = await self._peer(address)
        backend, why = self._transports.choose(peer, payload.nbytes)
        if not why:
            try:
                return backend, await backend.publish(payload.request_id, payload.tensors, peer)
            except (TransferError, ValueError, OSError) as err:
                # Shared memory full, a registration refused: this attempt goes inline.
                log.warning("%s could not publish with %s: %s", self.stage, backend.name, err)
                why = "publish_failed"
        self._metrics.fallback(self._transports.preferred.name, why)
        backend = self._transports.grpc
        return backend, await backend.publish(payload.request_id, payload.tensors, peer)

    async def _attempt(
        self, address: str, payload: Payload, received: asyncio.Future[None]
    ) -> tuple[_Outcome, str]:
        backend, outgoing = await self._publish(address, payload)
        call = self._channels.stub(address).Submit()
        if self._pool is not None:
            self._pool.reserve(address)
        reserved = self._pool is not None
        started = time.perf_counter()
        header = header_of(payload, outgoing.metas)
        writer = asyncio.create_task(
            write_payload(call, header, outgoing, self._delay.sample(self._rng))
        )
        pushing: asyncio.Task[None] | None = None
        try:
            ack = await call.read()
            if ack is not grpc.aio.EOF and ack.status == pb.Ack.FETCHING:
                # A pushing backend sends now; a failed push shows as the receiver's answer.
                pushing = asyncio.create_task(outgoing.start())
                ack = await call.read()
            if ack is grpc.aio.EOF:
                self._transports.forget(address)
                return _Outcome.BROKEN, "stream closed before an answer"
            self._report(address, ack)
            if reserved and self._pool is not None:
                self._pool.unreserve(address)
                reserved = False
            if ack.status == pb.Ack.REJECTED:
                if ack.retryable:
                    self._reply_peers.pop(address, None)  # what it accepts may have changed
                return (_Outcome.BUSY if ack.retryable else _Outcome.INVALID), ack.reason
            if ack.status == pb.Ack.RECEIVED:
                self._metrics.sent(payload.nbytes, time.perf_counter() - started, backend.name)
                await outgoing.release()  # fetched: the custody copy is `payload`
                if not received.done():
                    received.set_result(None)
                ack = await call.read()
                if ack is grpc.aio.EOF:
                    return _Outcome.BROKEN, "stream closed before DONE"
                self._report(address, ack)
            if ack.status == pb.Ack.DONE:
                return _Outcome.DONE, ""
            return _Outcome.BROKEN, f"unexpected ack {ack.status}"
        except grpc.aio.AioRpcError as err:
            self._transports.forget(address)
            return _Outcome.BROKEN, f"{err.code().name}: {err.details()}"
        finally:
            if reserved and self._pool is not None:
                self._pool.unreserve(address)
            for task in (writer, pushing):
                if task is None:
                    continue
                task.cancel()
                # Either may have failed on its own when the stream broke.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await task
            call.cancel()
            await outgoing.release()

    def _report(self, address: str, ack: pb.Ack) -> None:
        if self._pool is not None:
            self._pool.report(address, ack.queue_depth, ack.in_flight)
