"""Downstream instances of a stage: channels, health polling and load reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import grpc

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.runtime.aio import cancel_all, raise_if_cancelled
from disagfusion.worker.runtime.dispatch import InstanceLoad, choose_instance
from disagfusion.worker.security import tls as security
from disagfusion.worker.transport.base import Peer
from disagfusion.worker.transport.inline_wire import submit_method
from disagfusion.worker.transport.wire import peer_from_health

log = logging.getLogger(__name__)

# Large socket reads for inline tensor bytes: measured about 2x the default
# throughput for payloads of tens of MiB on loopback (ENVIRONMENT.md).
_READ_CHUNKS = [
    ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
    # A stream's initial flow-control window: the default 64 KiB makes a new
    # stream crawl through its first megabytes while BDP probing grows it.
    ("grpc.http2.lookahead_bytes", 16 << 20),
]
# Keepalive so a peer that vanishes without closing its socket (node lost)
# breaks the open custody streams within seconds, which triggers a retry.
CHANNEL_OPTIONS = [
    *_READ_CHUNKS,
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
SERVER_OPTIONS = [
    *_READ_CHUNKS,
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.max_receive_message_length", 16 << 20),
]


class ChannelCache:
    """One gRPC channel per address, shared by every sender in the process; mTLS
    when the process (or `tls`) has a certificate."""

    def __init__(self, tls: security.TlsConfig | Literal["process"] | None = "process") -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        # "process": the TLS the process was configured with (security.configure).
        self.tls = security.configured() if isinstance(tls, str) else tls

    def stub(self, address: str) -> pb_grpc.StageStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = security.open_channel(address, self.tls, CHANNEL_OPTIONS)
            self._channels[address] = channel
        stub = pb_grpc.StageStub(channel)
        stub.Submit = submit_method(channel)  # inline bytes without protobuf copies
        return stub

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


@dataclass
class _PeerState:
    address: str
    healthy: bool = False
    draining: bool = False
    ready: bool = False
    in_flight: int = 0
    queue_depth: int = 0
    queue_capacity: int = 1
    reserved: int = 0
    service_time_s: float = 0.0  # its service-time EWMA, from Health
    peer: Peer | None = None  # what it accepts, from its last Health reply


class PeerPool:
    """The instances of one downstream stage, polled for health and load."""

    def __init__(
        self,
        stage: str,
        addresses: Iterable[str],
        channels: ChannelCache,
        poll_interval_s: float = 0.2,
        health_timeout_s: float = 1.0,
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        self.stage = stage
        self._channels = channels
        # Called when a healthy instance stops answering (transports drop per-peer state).
        self._on_gone = on_gone
        self._peers = {a: _PeerState(a) for a in addresses}
        if not self._peers:
            raise ValueError(f"no addresses given for stage {stage!r}")
        self._poll_interval_s = poll_interval_s
        self._health_timeout_s = health_timeout_s
        self._changed = asyncio.Event()
        self._turn = 0
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def addresses(self) -> list[str]:
        return list(self._peers)

    def start(self) -> None:
        for address in self._peers:
            self._tasks.append(asyncio.create_task(self._poll(address)))

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        self._tasks.clear()

    def ready_count(self) -> int:
        return sum(1 for p in self._peers.values() if p.healthy and p.ready and not p.draining)

    def loads(self) -> list[InstanceLoad]:
        return [
            InstanceLoad(
                address=p.address,
                healthy=p.healthy and p.ready,
                draining=p.draining,
                in_flight=p.in_flight,
                queue_depth=p.queue_depth,
                queue_capacity=p.queue_capacity,
                reserved=p.reserved,
                service_time_s=p.service_time_s,
            )
            for p in self._peers.values()
        ]

    def peer(self, address: str) -> Peer:
        """`address` with the transports it accepts (grpc only until it answered Health)."""
        state = self._peers.get(address)
        if state is None or state.peer is None:
            return Peer(address)
        return state.peer

    def pick(self, exclude: set[str]) -> str | None:
        self._turn += 1
        return choose_instance(self.loads(), exclude, self._turn)

    async def wait_for_change(self, timeout_s: float) -> None:
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    def reserve(self, address: str) -> None:
        self._peers[address].reserved += 1

    def unreserve(self, address: str) -> None:
        peer = self._peers[address]
        peer.reserved = max(0, peer.reserved - 1)
        self._changed.set()

    def report(self, address: str, queue_depth: int, in_flight: int) -> None:
        """Load carried on an ack: fresher than the last health poll."""
        peer = self._peers[address]
        peer.queue_depth, peer.in_flight = queue_depth, in_flight
        self._changed.set()

    def mark_unhealthy(self, address: str) -> None:
        self._peers[address].healthy = False
        self._changed.set()

    async def _poll(self, address: str) -> None:
        peer = self._peers[address]
        stub = self._channels.stub(address)
        while True:
            try:
                reply = await stub.Health(pb.HealthRequest(), timeout=self._health_timeout_s)
            except grpc.aio.AioRpcError as err:
                raise_if_cancelled()
                if peer.healthy:
                    # A peer that said it was draining left on purpose (scale-down, shutdown).
                    level = logging.INFO if peer.draining else logging.WARNING
                    how = "gone after draining" if peer.draining else "unreachable"
                    log.log(level, "%s instance %s %s: %s", self.stage, address, how, err.code())
                    if self._on_gone is not None:
                        self._on_gone(address)
                peer.healthy = False
            else:
                peer.healthy = True
                peer.ready = reply.ready
                peer.draining = reply.draining
                peer.queue_depth = reply.queue_depth
                peer.in_flight = reply.in_flight
                peer.queue_capacity = reply.queue_capacity
                peer.service_time_s = reply.service_time_ewma_s
                peer.peer = peer_from_health(address, reply)
            self._changed.set()
            await asyncio.sleep(self._poll_interval_s)
