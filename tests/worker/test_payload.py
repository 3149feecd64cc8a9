"""Payload wire format: header + raw tensor bytes in chunks, and its validation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import pytest
import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.params import GenerationParams
from disagfusion.worker.runtime.payload import (
    Payload,
    PayloadError,
    data_chunks,
    header_of,
    payload_from,
    read_tensors,
    validate_header,
)


async def _aiter(chunks: Iterable[pb.WorkChunk]) -> AsyncIterator[pb.WorkChunk]:
    for chunk in chunks:
        yield chunk


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        # Odd byte counts first, so later wider dtypes start at unaligned offsets.
        "mask": torch.tensor([True, False, True]),
        "u8": torch.arange(5, dtype=torch.uint8),
        "latents": torch.randn(2, 3, 5, generator=g),
        "bf16": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "i8": torch.tensor([-3, 0, 7], dtype=torch.int8),
        "f16": torch.randn(4, 1, generator=g).to(torch.float16),
        "empty": torch.empty(0, 3),
        "ids": torch.tensor([[1, 2], [3, -4]], dtype=torch.int64),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty_bf16": torch.empty(2, 0, dtype=torch.bfloat16),
        "i16": torch.tensor([1, -2, 300], dtype=torch.int16),
        "i32": torch.tensor([7], dtype=torch.int32),
        # Non-contiguous input: travels as its logical (contiguous) layout.
        "transposed": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
    }


def _payload(tensors: dict[str, torch.Tensor] | None = None) -> Payload:
    return Payload(
        request_id="req-1",
        params=GenerationParams(prompt="a cat", width=128, height=64, seed=42, num_images=2),
        tensors=_tensors() if tensors is None else tensors,
        deadline_unix=1234.5,
        reply_to="127.0.0.1:1",
        pipeline="p",
        model="m",
        source_stage="encoder",
    )


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
async def test_round_trip_preserves_every_dtype_shape_and_value(chunk_bytes: int) -> None:
    sent = _payload()
    header = header_of(sent)
    validate_header(header)
    chunks = list(data_chunks(sent, chunk_bytes=chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert sum(len(c.data) for c in chunks) == sent.nbytes

    tensors = await read_tensors(header, _aiter(chunks))
    got = payload_from(header, tensors)

    assert list(got.tensors) == list(sent.tensors)
    for name, t in sent.tensors.items():
        r = got.tensors[name]
        assert r.dtype == t.dtype, name
        assert r.shape == t.shape, name
        assert torch.equal(r, t), name
    assert got.params == sent.params
    assert (got.request_id, got.deadline_unix, got.reply_to) == ("req-1", 1234.5, "127.0.0.1:1")
    assert (got.pipeline, got.model, got.source_stage) == ("p", "m", "encoder")


async def test_payload_without_tensors_needs_no_data_chunks() -> None:
    sent = _payload({})
    header = header_of(sent)
    validate_header(header)
    assert list(data_chunks(sent)) == []
    assert await read_tensors(header, _aiter([])) == {}


async def test_error_payload_round_trips_its_code() -> None:
    failed = _payload().failed(400, "prompt too long", "encoder")
    header = header_of(failed)
    got = payload_from(header, await read_tensors(header, _aiter(data_chunks(failed))))
    assert got.tensors == {}
    assert (got.error, got.error_code, got.source_stage) == ("prompt too long", 400, "encoder")


def _header(**meta: object) -> pb.WorkHeader:
    h = header_of(_payload({"x": torch.zeros(2, 3)}))
    for key, value in meta.items():
        if key == "request_id":
            h.request_id = value  # type: ignore[assignment]
        else:
            setattr(h.tensors[0], key, value)
    return h


def test_validate_header_accepts_a_well_formed_header() -> None:
    validate_header(_header())


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (_header(request_id=""), "request_id"),
        (_header(dtype="complex64"), "dtype"),
        (_header(dtype="torch.float32"), "dtype"),
        (_header(nbytes=23), "nbytes"),
        (_header(nbytes=0), "nbytes"),
    ],
)
def test_validate_header_rejects_bad_headers(header: pb.WorkHeader, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        validate_header(header)


def test_validate_header_rejects_duplicate_tensor_names() -> None:
    h = _header()
    h.tensors.append(h.tensors[0])
    with pytest.raises(PayloadError, match="twice"):
        validate_header(h)


def test_validate_header_rejects_negative_dimensions() -> None:
    h = _header()
    del h.tensors[0].shape[:]
    h.tensors[0].shape.extend([-2, -3])
    h.tensors[0].nbytes = 24
    with pytest.raises(PayloadError, match="negative"):
        validate_header(h)


async def test_read_tensors_rejects_a_short_stream() -> None:
    sent = _payload({"x": torch.ones(4)})
    chunks = list(data_chunks(sent, chunk_bytes=4))
    with pytest.raises(PayloadError, match="ended after 12 of 16 bytes"):
        await read_tensors(header_of(sent), _aiter(chunks[:-1]))


async def test_read_tensors_rejects_an_overlong_stream() -> None:
    sent = _payload({"x": torch.ones(4)})
    chunks = [pb.WorkChunk(data=b"\0" * 12), pb.WorkChunk(data=b"\0" * 8)]
    with pytest.raises(PayloadError, match="more than the 16 bytes"):
        await read_tensors(header_of(sent), _aiter(chunks))


async def test_read_tensors_rejects_a_second_header() -> None:
    sent = _payload({"x": torch.ones(4)})
    chunks = [pb.WorkChunk(data=b"\0" * 8), pb.WorkChunk(header=header_of(sent))]
    with pytest.raises(PayloadError, match="second header"):
        await read_tensors(header_of(sent), _aiter(chunks))
