"""`grpc`: tensor bytes inline on the Submit stream itself. Works everywhere.

Tuned for throughput: 1 MiB chunks (larger ones are slower), each written as
a data message straight from the tensor's memory (one copy, inline_wire.py),
parsed on arrival as a view of the received bytes and copied once into one
receive buffer (reused: base.RECEIVE_BUFFERS) whose views are the tensors;
the channel and server read the socket in large chunks (peers.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence

import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.transport.base import (
    DTYPES,
    RECEIVE_BUFFERS,
    Backend,
    DescriptorError,
    Outgoing,
    Peer,
    host_bytes,
    meta_for,
)

CHUNK_BYTES = 1 << 20


def inline_chunks(
    tensors: Iterable[torch.Tensor], chunk_bytes: int = CHUNK_BYTES
) -> Iterator[memoryview]:
    """The tensors' bytes in order, cut into chunks: views of their memory,
    copied once, when each message is sent."""
    for t in tensors:
        view = host_bytes(t)
        for start in range(0, len(view), chunk_bytes):
            yield view[start : start + chunk_bytes]


class GrpcBackend(Backend):
    name = "grpc"
    location = pb.INLINE
    option_help = {"chunk_bytes": "bytes per DataChunk message (default 1 MiB)"}

    def __init__(self, options: Mapping[str, str] | None = None, device: str = "cpu") -> None:
        super().__init__(options, device)
        self.chunk_bytes = int(self.options.get("chunk_bytes", CHUNK_BYTES))
        if self.chunk_bytes <= 0 or self.chunk_bytes > 8 << 20:
            raise ValueError("transport option chunk_bytes must be in 1..8388608")

    def reaches(self, peer: Peer) -> bool:
        return True  # every receiver reads inline bytes

    async def publish(
        self, request_id: str, tensors: Mapping[str, torch.Tensor], peer: Peer
    ) -> Outgoing:
        metas = [meta_for(name, t, pb.INLINE) for name, t in tensors.items()]
        return Outgoing(metas, inline=self._chunks(list(tensors.values())))

    def _chunks(self, tensors: list[torch.Tensor]) -> Iterator[memoryview]:
        return inline_chunks(tensors, self.chunk_bytes)

    def check(self, request_id: str, metas: Sequence[pb.TensorMeta]) -> None:
        for meta in metas:
            if meta.handle:
                raise DescriptorError(f"tensor {meta.name!r}: an INLINE tensor has no handle")

    async def fetch(
        self,
        request_id: str,
        metas: Sequence[pb.TensorMeta],
        inline: AsyncIterator[bytes],
    ) -> dict[str, torch.Tensor]:
        need = sum(m.nbytes for m in metas)
        raw = RECEIVE_BUFFERS.take(need)
        buf = memoryview(raw.numpy().data) if need else memoryview(bytearray())
        got = 0
        while got < need:
            try:
                data = await inline.__anext__()
            except StopAsyncIteration:
                # A live sender never does this (a dead one reads no answer): a bug, not retried.
                raise DescriptorError(f"stream ended after {got} of {need} bytes") from None
            if got + len(data) > need:
                raise DescriptorError(f"stream sent more than the {need} bytes announced")
            buf[got : got + len(data)] = data
            got += len(data)
        tensors: dict[str, torch.Tensor] = {}
        offset = 0
        for meta in metas:
            dtype = DTYPES[meta.dtype]
            part = raw[offset : offset + meta.nbytes]
            if offset % dtype.itemsize:
                part = part.clone()  # a view as a wider dtype must start at a multiple of its size
            offset += meta.nbytes
            tensors[meta.name] = part.view(dtype).reshape(tuple(meta.shape))
        return tensors
