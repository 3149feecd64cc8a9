"""A unit of work between hops: header fields plus named tensors.

The header says each tensor's name, shape, dtype and where its bytes are; a
transport (worker/transport) moves the bytes: inline DataChunk messages after
the header by default.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace

import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.params import GenerationParams
from disagfusion.worker.transport.base import (
    DTYPES,
    MAX_HANDLE_BYTES,
    DescriptorError,
    TransferError,
    meta_for,
)
from disagfusion.worker.transport.grpc import CHUNK_BYTES, GrpcBackend, inline_chunks
from disagfusion.worker.transport.inline_wire import MalformedChunk
from disagfusion.worker.transport.wire import inline_data

_INLINE = GrpcBackend()
_LOCATIONS = frozenset(v for v in pb.TensorLocation.values() if v)

# What a receiver takes from a header, checked before it allocates anything: the
# declared bytes (RuntimeConfig.max_payload_bytes, this by default: frames of a long
# high-resolution video fit), and counts that keep the checks themselves cheap (the
# product of a million 63-bit dimensions would hold the event loop for hours).
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30
MAX_TENSORS = 1024
MAX_DIMS = 16
MAX_NAME_CHARS = 256  # a tensor's name, a request id
_SHOWN = 40  # characters of a sender's string echoed in an error


class PayloadError(ValueError):
    """A payload that does not match its header: the sender has a bug."""


@dataclass
class Payload:
    request_id: str
    params: GenerationParams
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    deadline_unix: float = 0.0
    slo_deadline_unix: float = 0.0  # 0: no SLO
    reply_to: str = ""
    pipeline: str = ""
    model: str = ""
    source_stage: str = ""
    error: str = ""
    error_code: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def failed(self, code: int, message: str, source_stage: str) -> Payload:
        """The terminal-error form of this payload, sent to the gateway."""
        return replace(self, tensors={}, error=message, error_code=code, source_stage=source_stage)


def params_to_proto(p: GenerationParams) -> pb.GenerationParams:
    return pb.GenerationParams(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        width=p.width,
        height=p.height,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        seed=p.seed,
        num_images=p.num_images,
        num_frames=p.num_frames,
        fps=p.fps,
        keep_frames=p.keep_frames,
    )


def params_from_proto(m: pb.GenerationParams) -> GenerationParams:
    return GenerationParams(
        prompt=m.prompt,
        negative_prompt=m.negative_prompt,
        width=m.width,
        height=m.height,
        num_inference_steps=m.num_inference_steps,
        guidance_scale=m.guidance_scale,
        seed=m.seed,
        num_images=m.num_images,
        # Senders older than video leave it 0: an image.
        num_frames=m.num_frames or 1,
        fps=m.fps or 16,
        keep_frames=m.keep_frames,
    )


def header_of(payload: Payload, metas: list[pb.TensorMeta] | None = None) -> pb.WorkHeader:
    """The payload's header; `metas` are what a transport published (INLINE
    descriptors when not given)."""
    if metas is None:
        metas = [meta_for(name, t, pb.INLINE) for name, t in payload.tensors.items()]
    return pb.WorkHeader(
        request_id=payload.request_id,
        pipeline=payload.pipeline,
        model=payload.model,
        params=params_to_proto(payload.params),
        tensors=metas,
        deadline_unix=payload.deadline_unix,
        slo_deadline_unix=payload.slo_deadline_unix,
        reply_to=payload.reply_to,
        error=payload.error,
        error_code=payload.error_code,
        source_stage=payload.source_stage,
    )


def data_chunks(payload: Payload, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.WorkChunk]:
    """The tensor bytes inline, in header order, cut into chunks (the grpc transport)."""
    for chunk in inline_chunks(payload.tensors.values(), chunk_bytes):
        yield pb.WorkChunk(data=bytes(chunk))


def _show(text: str) -> str:
    return repr(text[:_SHOWN]) + (f"... ({len(text)} characters)" if len(text) > _SHOWN else "")


def validate_header(h: pb.WorkHeader, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> None:
    """Raise PayloadError when the header cannot describe a sane payload of at most
    ``max_bytes`` tensor bytes. Allocates nothing and takes microseconds."""
    if not h.request_id:
        raise PayloadError("header has no request_id")
    if len(h.request_id) > MAX_NAME_CHARS:
        raise PayloadError(f"request_id {_show(h.request_id)} is over {MAX_NAME_CHARS} characters")
    if len(h.tensors) > MAX_TENSORS:
        raise PayloadError(f"header lists {len(h.tensors)} tensors, over {MAX_TENSORS}")
    total = 0
    names = set()
    for meta in h.tensors:
        name = _show(meta.name)
        if len(meta.name) > MAX_NAME_CHARS:
            raise PayloadError(f"tensor name {name} is over {MAX_NAME_CHARS} characters")
        if meta.name in names:
            raise PayloadError(f"tensor {name} appears twice")
        names.add(meta.name)
        if meta.dtype not in DTYPES:
            raise PayloadError(f"tensor {name} has unsupported dtype {_show(meta.dtype)}")
        if meta.location not in _LOCATIONS:
            raise PayloadError(f"tensor {name} has unknown location {meta.location}")
        if len(meta.handle) > MAX_HANDLE_BYTES:
            raise PayloadError(f"tensor {name}: handle of {len(meta.handle)} bytes")
        if len(meta.shape) > MAX_DIMS:
            raise PayloadError(f"tensor {name} has {len(meta.shape)} dimensions, over {MAX_DIMS}")
        if any(d < 0 for d in meta.shape):
            raise PayloadError(f"tensor {name} has a negative dimension")
        expected = math.prod(meta.shape) * DTYPES[meta.dtype].itemsize
        if meta.nbytes != expected:
            raise PayloadError(
                f"tensor {name}: nbytes {meta.nbytes} != {expected} for its shape/dtype"
            )
        total += meta.nbytes
        if total > max_bytes:
            raise PayloadError(
                f"payload declares at least {total} bytes; this receiver takes at most {max_bytes}"
            )


async def read_header(
    chunks: AsyncIterator[pb.WorkChunk], max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> pb.WorkHeader:
    """The first message of a Submit stream, which must be a valid WorkHeader
    declaring at most ``max_bytes`` of tensors."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        raise PayloadError("stream ended before a WorkHeader") from None
    if isinstance(first, MalformedChunk):
        raise PayloadError(f"the first message is not a WorkChunk: {first.error}")
    if first.WhichOneof("kind") != "header":
        raise PayloadError("stream must start with a WorkHeader")
    validate_header(first.header, max_bytes)
    return first.header


def expected_bytes(h: pb.WorkHeader) -> int:
    return sum(m.nbytes for m in h.tensors)


async def read_tensors(
    h: pb.WorkHeader, chunks: AsyncIterator[pb.WorkChunk]
) -> dict[str, torch.Tensor]:
    """Read an INLINE payload's bytes from the stream (the grpc transport)."""
    try:
        return await _INLINE.fetch(h.request_id, h.tensors, inline_data(chunks))
    except (DescriptorError, TransferError) as err:
        raise PayloadError(str(err)) from None


def payload_from(h: pb.WorkHeader, tensors: dict[str, torch.Tensor]) -> Payload:
    return Payload(
        request_id=h.request_id,
        params=params_from_proto(h.params),
        tensors=tensors,
        deadline_unix=h.deadline_unix,
        slo_deadline_unix=h.slo_deadline_unix,
        reply_to=h.reply_to,
        pipeline=h.pipeline,
        model=h.model,
        source_stage=h.source_stage,
        error=h.error,
        error_code=h.error_code,
    )
