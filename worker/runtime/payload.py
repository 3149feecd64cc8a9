"""A unit of work between hops: header fields plus named tensors.

Tensors travel as raw bytes in DataChunk messages after the header (the gRPC
streaming transport); the header says each tensor's name, shape and dtype.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace

import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.params import GenerationParams

CHUNK_BYTES = 1 << 20  # 1 MiB: measured fastest for gRPC streams here
MAX_PAYLOAD_BYTES = 4 << 30

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "bool",
    )
}


class PayloadError(ValueError):
    """A payload that does not match its header: the sender has a bug."""


@dataclass
class Payload:
    request_id: str
    params: GenerationParams
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    deadline_unix: float = 0.0
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


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    array = flat.view(torch.uint8).numpy()
    return memoryview(array.data).cast("B")


def header_of(payload: Payload) -> pb.WorkHeader:
    metas = [
        pb.TensorMeta(
            name=name,
            shape=list(t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            nbytes=t.numel() * t.element_size(),
            location=pb.INLINE,
        )
        for name, t in payload.tensors.items()
    ]
    return pb.WorkHeader(
        request_id=payload.request_id,
        pipeline=payload.pipeline,
        model=payload.model,
        params=params_to_proto(payload.params),
        tensors=metas,
        deadline_unix=payload.deadline_unix,
        reply_to=payload.reply_to,
        error=payload.error,
        error_code=payload.error_code,
        source_stage=payload.source_stage,
    )


def data_chunks(payload: Payload, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.WorkChunk]:
    """The tensor bytes, in header order, cut into chunks."""
    for t in payload.tensors.values():
        view = _tensor_bytes(t)
        for start in range(0, len(view), chunk_bytes):
            yield pb.WorkChunk(data=bytes(view[start : start + chunk_bytes]))


def validate_header(h: pb.WorkHeader) -> None:
    """Raise PayloadError when the header cannot describe a sane payload."""
    if not h.request_id:
        raise PayloadError("header has no request_id")
    total = 0
    names = set()
    for meta in h.tensors:
        if meta.name in names:
            raise PayloadError(f"tensor {meta.name!r} appears twice")
        names.add(meta.name)
        if meta.dtype not in _DTYPES:
            raise PayloadError(f"tensor {meta.name!r} has unsupported dtype {meta.dtype!r}")
        if meta.location != pb.INLINE:
            raise PayloadError(f"tensor {meta.name!r}: only INLINE tensors are supported")
        if any(d < 0 for d in meta.shape):
            raise PayloadError(f"tensor {meta.name!r} has a negative dimension")
        expected = math.prod(meta.shape) * _DTYPES[meta.dtype].itemsize
        if meta.nbytes != expected:
            raise PayloadError(
                f"tensor {meta.name!r}: nbytes {meta.nbytes} != {expected} for its shape/dtype"
            )
        total += meta.nbytes
    if total > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload of {total} bytes exceeds {MAX_PAYLOAD_BYTES}")


async def read_header(chunks: AsyncIterator[pb.WorkChunk]) -> pb.WorkHeader:
    """The first message of a Submit stream, which must be a valid WorkHeader."""
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        raise PayloadError("stream ended before a WorkHeader") from None
    if first.WhichOneof("kind") != "header":
        raise PayloadError("stream must start with a WorkHeader")
    validate_header(first.header)
    return first.header


def expected_bytes(h: pb.WorkHeader) -> int:
    return sum(m.nbytes for m in h.tensors)


async def read_tensors(
    h: pb.WorkHeader, chunks: AsyncIterator[pb.WorkChunk]
) -> dict[str, torch.Tensor]:
    """Read exactly the header's bytes from the stream and rebuild the tensors."""
    need = expected_bytes(h)
    buf = bytearray(need)
    got = 0
    while got < need:
        try:
            msg = await chunks.__anext__()
        except StopAsyncIteration:
            raise PayloadError(f"stream ended after {got} of {need} bytes") from None
        if msg.WhichOneof("kind") != "data":
            raise PayloadError("a second header arrived inside a payload")
        if got + len(msg.data) > need:
            raise PayloadError(f"stream sent more than the {need} bytes its header announced")
        buf[got : got + len(msg.data)] = msg.data
        got += len(msg.data)
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    raw = torch.frombuffer(buf, dtype=torch.uint8) if need else torch.empty(0, dtype=torch.uint8)
    for meta in h.tensors:
        dtype = _DTYPES[meta.dtype]
        part = raw[offset : offset + meta.nbytes]
        if offset % dtype.itemsize:
            # A view as a wider dtype must start at a multiple of its size.
            part = part.clone()
        offset += meta.nbytes
        tensors[meta.name] = part.view(dtype).reshape(tuple(meta.shape))
    return tensors


def payload_from(h: pb.WorkHeader, tensors: dict[str, torch.Tensor]) -> Payload:
    return Payload(
        request_id=h.request_id,
        params=params_from_proto(h.params),
        tensors=tensors,
        deadline_unix=h.deadline_unix,
        reply_to=h.reply_to,
        pipeline=h.pipeline,
        model=h.model,
        source_stage=h.source_stage,
        error=h.error,
        error_code=h.error_code,
    )
