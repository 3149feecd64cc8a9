"""The transports of one process on the Submit stream: the one it sends with,
the ones it accepts, the choice per receiver (falling back to `grpc` when the
receiver does not accept the preferred backend or cannot be reached with it),
and the steps both ends of a stream take."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.transport import open_backend
from disagfusion.worker.transport.base import Backend, DescriptorError, NotAccepted, Outgoing, Peer
from disagfusion.worker.transport.inline_wire import InlineChunk, MalformedChunk


class Transports:
    """`grpc` always, plus the configured backend: sends with the configured one
    where the receiver can take it, accepts both."""

    def __init__(self, preferred: Backend, grpc_backend: Backend | None = None) -> None:
        self.preferred = preferred
        fallback = preferred if preferred.name == "grpc" else grpc_backend
        self.grpc = fallback if fallback is not None else open_backend("grpc")
        self._by_name = {b.name: b for b in (self.grpc, preferred)}
        self._by_location = {b.location: b for b in self._by_name.values()}

    @classmethod
    def open(
        cls, name: str = "grpc", options: Mapping[str, str] | None = None, device: str = "cpu"
    ) -> Transports:
        """Options are the preferred backend's (`grpc` options apply to grpc alone)."""
        preferred = open_backend(name, options, device)
        return cls(preferred)

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def endpoints(self) -> dict[str, str]:
        return {name: b.endpoint() for name, b in self._by_name.items() if b.endpoint()}

    def advertise(self, reply: pb.HealthReply) -> pb.HealthReply:
        """`reply` with what this process accepts filled in."""
        reply.transports.extend(self.names)
        reply.transport_endpoints.update(self.endpoints())
        return reply

    def choose(self, peer: Peer, nbytes: int | None = None) -> tuple[Backend, str]:
        """The backend for sending `nbytes` to `peer`, and why it is not the
        preferred one when that is a fallback ("" otherwise: also for a payload
        small enough to go inline by design)."""
        if self.preferred.name == "grpc":
            return self.preferred, ""
        if nbytes is not None and nbytes < self.preferred.inline_below:
            return self.grpc, ""
        if self.preferred.name not in peer.accepts:
            return self.grpc, "not_accepted"
        if not self.preferred.reaches(peer):
            return self.grpc, "unreachable"
        return self.preferred, ""

    def for_metas(self, metas: Sequence[pb.TensorMeta]) -> Backend:
        """The backend that fetches a header's tensors; DescriptorError when this
        process does not accept their location (or they mix locations)."""
        locations = {m.location for m in metas} or {pb.INLINE}
        if len(locations) > 1:
            raise DescriptorError("a payload's tensors must all use one transport")
        (location,) = locations
        backend = self._by_location.get(location)
        if backend is None:
            known = location in pb.TensorLocation.values()
            name = pb.TensorLocation.Name(location) if known else str(location)
            raise NotAccepted(
                f"transport {name} not accepted here (accepted: {', '.join(self.names)})"
            )
        return backend

    def forget(self, address: str) -> None:
        for backend in self._by_name.values():
            backend.forget(address)

    async def close(self) -> None:
        for backend in self._by_name.values():
            await backend.close()


def peer_from_health(address: str, reply: pb.HealthReply) -> Peer:
    # A receiver older than transports advertises nothing: it reads inline bytes only.
    accepts = frozenset(reply.transports) | {"grpc"}
    return Peer(address, accepts, dict(reply.transport_endpoints))


async def inline_data(stream: AsyncIterator[pb.WorkChunk]) -> AsyncIterator[bytes]:
    """The data chunks that follow a header on a Submit stream."""
    async for msg in stream:
        kind = msg.WhichOneof("kind")
        if kind != "data":
            if isinstance(msg, MalformedChunk):
                raise DescriptorError(f"a message in the payload is not a WorkChunk: {msg.error}")
            if kind == "header":
                raise DescriptorError("a second header arrived inside a payload")
            raise DescriptorError("an empty WorkChunk (neither header nor data) inside a payload")
        yield msg.data


async def fetch_tensors(
    backend: Backend,
    header: pb.WorkHeader,
    stream: AsyncIterator[pb.WorkChunk],
) -> dict[str, torch.Tensor]:
    """The header's tensors; DescriptorError when the stream does not end where its
    header says (every sender half-closes after its inline bytes)."""
    data = inline_data(stream)
    tensors = await backend.fetch(header.request_id, header.tensors, data)
    async for _ in data:
        announced = sum(m.nbytes for m in header.tensors if m.location == pb.INLINE)
        raise DescriptorError(f"stream sent data after the {announced} bytes announced")
    return tensors


def accept(transports: Transports, header: pb.WorkHeader) -> Backend:
    """Receiver: the backend that will fetch this header's tensors, after checking
    their descriptors. DescriptorError: reject the payload as invalid. A pushing
    backend needs a FETCHING ack before fetch_tensors."""
    backend = transports.for_metas(header.tensors)
    backend.check(header.request_id, header.tensors)
    return backend


async def write_payload(
    call: Any, header: pb.WorkHeader, outgoing: Outgoing, delay_s: float = 0.0
) -> None:
    """Sender: the header (with the published metas) then any inline bytes.
    `delay_s` emulates network time (benchmarks) while the receiver waits."""
    del header.tensors[:]
    header.tensors.extend(outgoing.metas)
    await call.write(pb.WorkChunk(header=header))
    if delay_s:
        await asyncio.sleep(delay_s)
    for data in outgoing.inline:
        await call.write(InlineChunk(data))
    await call.done_writing()
