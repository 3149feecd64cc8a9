"""Malformed WorkChunk streams against a real stage's gRPC server (StageRuntime on
127.0.0.1, in a thread of its own; the client writes raw bytes).

Every stream must end in a clean rejection (REJECTED, not retryable unless the
transport is merely not accepted here, with a reason naming the problem), the
stage must allocate nothing for a header it refuses and never more than its
bound, and a valid request right after must still be served.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.params import GenerationParams
from disagfusion.worker.runtime.payload import (
    MAX_DIMS,
    Payload,
    PayloadError,
    data_chunks,
    header_of,
    validate_header,
)
from disagfusion.worker.runtime.stage import RuntimeConfig, StageRuntime
from disagfusion.worker.transport import base
from disagfusion.worker.transport.base import DTYPES, DescriptorError, NotAccepted
from disagfusion.worker.transport.inline_wire import SUBMIT_PATH, MalformedChunk, parse_chunk
from disagfusion.worker.transport.wire import Transports, accept
from tests.worker.runtime_harness import PIPELINE, ROLE, WAIT_S, Cluster

pytestmark = pytest.mark.timeout(240)

BOUND = 1 << 20  # the stage's max_payload_bytes here
INT64 = 2**63 - 1
# Messages protobuf cannot parse (truncated fields, a bad wire type).
GARBAGE = [b"\x0a\xff", b"\xff\xff\xff", b"\x12\x05ab", b"\x0f"]
T = TypeVar("T")


def _compute(params: GenerationParams, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"out": torch.zeros(1)}


@dataclass
class Stage:
    """The stage and a fake gateway on a loop in a background thread."""

    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    taken: list[int] = field(default_factory=list)  # receive-buffer sizes asked for
    addr: str = ""
    gw_addr: str = ""

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.cluster = Cluster()
        self.runtime = self.run(self._make_runtime())
        self.gateway, self.gw_addr = self.run(self.cluster.gateway())
        self.addr = self.run(self._start())
        self.channel = grpc.insecure_channel(self.addr)
        # raw bytes out, so that a stream can hold messages that are not WorkChunks
        self.submit = self.channel.stream_stream(
            SUBMIT_PATH, request_serializer=lambda b: b, response_deserializer=pb.Ack.FromString
        )

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S * 3)

    async def _make_runtime(self) -> StageRuntime:
        config = RuntimeConfig(
            role=ROLE,
            model="fake",
            pipeline=PIPELINE,
            drain_timeout_s=WAIT_S,
            max_payload_bytes=BOUND,
        )
        return StageRuntime(config)

    async def _start(self) -> str:
        addr = await self.cluster.serve(self.runtime)
        self.runtime.start()
        await self.runtime.load(lambda: _compute)
        return addr

    def send(self, messages: list[bytes]) -> list[pb.Ack]:
        return list(self.submit(iter(messages), timeout=WAIT_S))

    def close(self) -> None:
        self.channel.close()
        self.run(self.cluster.close())
        self.run(self.runtime.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT_S)


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    s = Stage()
    real_take = base.RECEIVE_BUFFERS.take

    def recording_take(nbytes: int) -> torch.Tensor:
        s.taken.append(nbytes)
        return real_take(nbytes)

    base.RECEIVE_BUFFERS.take = recording_take  # type: ignore[method-assign]
    try:
        yield s
    finally:
        del base.RECEIVE_BUFFERS.take  # the class's method again
        s.close()


_ids = itertools.count()


def _valid_payload(rid: str, gw_addr: str) -> Payload:
    return Payload(
        request_id=rid,
        params=GenerationParams(prompt="ok"),
        tensors={"x": torch.arange(6, dtype=torch.float32)},
        reply_to=gw_addr,
        pipeline=PIPELINE,
        model="fake",
        source_stage="denoiser",
    )


def _serialize(messages: list[pb.WorkChunk]) -> list[bytes]:
    return [m.SerializeToString() for m in messages]


def assert_still_serves(stage: Stage) -> None:
    rid = f"valid-{next(_ids)}"
    p = _valid_payload(rid, stage.gw_addr)
    acks = stage.send(_serialize([pb.WorkChunk(header=header_of(p)), *data_chunks(p)]))
    assert [pb.Ack.Status.Name(a.status) for a in acks] == ["RECEIVED", "DONE"], acks
    assert any(r.request_id == rid for r in stage.gateway.results)


def _rejected(acks: list[pb.Ack]) -> pb.Ack:
    assert len(acks) == 1 and acks[0].status == pb.Ack.REJECTED, acks
    assert acks[0].reason
    return acks[0]


# ------------------------------------------------------------------------ strategies

_dims = st.one_of(
    st.integers(0, 6),
    st.integers(0, 6),
    st.integers(-3, 3),
    st.sampled_from([2**20, 2**31, 2**40, 2**62, INT64]),
)
_metas: st.SearchStrategy[dict[str, Any]] = st.builds(
    dict,
    name=st.one_of(st.none(), st.none(), st.none(), st.sampled_from(["x", "", "n" * 300])),
    shape=st.one_of(st.lists(_dims, max_size=3), st.lists(_dims, max_size=MAX_DIMS + 4)),
    dtype=st.one_of(
        st.sampled_from(list(DTYPES)),
        st.sampled_from(["complex64", "torch.float32", "", "f" * 100]),
    ),
    nbytes=st.one_of(st.none(), st.none(), st.integers(-(2**63), INT64)),
    location=st.sampled_from([pb.INLINE, pb.INLINE, pb.INLINE, 0, pb.SHM, 99]),
    handle=st.sampled_from([b"", b"", b"handle"]),
)
_good_metas: st.SearchStrategy[dict[str, Any]] = (
    st.builds(  # well-formed, so that the bytes after the header get fuzzed too
        dict,
        name=st.none(),
        shape=st.lists(st.integers(0, 16), max_size=3),
        dtype=st.sampled_from(list(DTYPES)),
        nbytes=st.none(),
        location=st.just(pb.INLINE),
        handle=st.just(b""),
    )
)


def _meta(index: int, spec: dict[str, Any]) -> pb.TensorMeta:
    nbytes = spec["nbytes"]
    if nbytes is None:  # consistent with the shape, where int64 can say it
        itemsize = DTYPES[spec["dtype"]].itemsize if spec["dtype"] in DTYPES else 4
        nbytes = max(-(2**63), min(INT64, math.prod(spec["shape"]) * itemsize))
    return pb.TensorMeta(
        name=f"t{index}" if spec["name"] is None else spec["name"],
        shape=spec["shape"],
        dtype=spec["dtype"],
        nbytes=nbytes,
        location=spec["location"],
        handle=spec["handle"],
    )


@st.composite
def _headers(draw: st.DrawFn, gw_addr: str) -> pb.WorkHeader:
    rid = draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(["", "r" * 300])))
    if rid is None:
        rid = f"fuzz-{next(_ids)}"  # a valid payload is computed; an id is never reused
    metas = [
        _meta(i, spec)
        for i, spec in enumerate(
            draw(st.lists(st.one_of(_good_metas, _good_metas, _metas), max_size=4))
        )
    ]
    return pb.WorkHeader(
        request_id=rid,
        params=pb.GenerationParams(prompt="fuzz"),
        tensors=metas,
        reply_to=gw_addr,
        pipeline=PIPELINE,
        model="fake",
        source_stage="denoiser",
    )


_BODY_KINDS = ["exact", "short", "long", "header", "garbage", "empty", "after"]


@dataclass
class Case:
    messages: list[bytes]
    header: pb.WorkHeader  # the first message
    body: str  # what is wrong after the header


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@st.composite
def _cases(draw: st.DrawFn, gw_addr: str) -> Case:
    header = draw(_headers(gw_addr))
    need = sum(m.nbytes for m in header.tensors)
    body = draw(st.sampled_from(_BODY_KINDS))
    size = need if 0 <= need <= BOUND else 0
    if body == "short" and size > 0:
        size = draw(st.integers(0, size - 1))
    elif body == "long":
        size += draw(st.integers(1, 64))
    data = draw(st.binary(min_size=size, max_size=size)) if size < 4096 else b"\1" * size
    chunks = [
        pb.WorkChunk(data=part).SerializeToString()
        for part in _split(data, draw(st.lists(st.integers(0, 2**20), max_size=4)))
    ]
    at = draw(st.integers(0, len(chunks)))
    if body == "header":
        chunks.insert(at, pb.WorkChunk(header=header).SerializeToString())
    elif body == "garbage":
        chunks.insert(at, draw(st.sampled_from(GARBAGE)))
    elif body == "empty":
        chunks.insert(at, pb.WorkChunk().SerializeToString())
    elif body == "after":
        chunks.append(pb.WorkChunk(data=b"\7").SerializeToString())
    return Case([pb.WorkChunk(header=header).SerializeToString(), *chunks], header, body)


# ------------------------------------------------------------------------ the oracle

_TRANSPORTS = Transports.open("grpc")  # what the stage accepts: grpc (INLINE) only


def _header_problem(header: pb.WorkHeader) -> tuple[str, bool] | None:
    """(reason, retryable) for a header the stage must refuse, else None."""
    try:
        validate_header(header, BOUND)
    except PayloadError as err:
        return f"invalid payload: {err}", False
    try:
        accept(_TRANSPORTS, header)
    except NotAccepted as err:
        return str(err), True
    except DescriptorError as err:
        return f"invalid payload: {err}", False
    return None


def _body_fragment(case: Case, need: int) -> str | None:
    """What the reason must say about the messages after a valid header (None: the
    payload is taken). The receiver reads data until it has the announced bytes,
    then expects the stream to end."""
    got = 0
    for raw in case.messages[1:]:
        msg = parse_chunk(raw)
        if isinstance(msg, MalformedChunk):
            return "is not a WorkChunk"
        kind = msg.WhichOneof("kind")
        if kind == "header":
            return "second header"
        if kind is None:
            return "empty WorkChunk"
        if got >= need:
            return f"data after the {need} bytes announced"
        if got + len(msg.data) > need:
            return f"more than the {need} bytes announced"
        got += len(msg.data)
    if got < need:
        return f"stream ended after {got} of {need} bytes"
    return None


FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(data=st.data())
def test_malformed_streams_are_rejected_cleanly_and_the_stage_goes_on(
    stage: Stage, data: st.DataObject
) -> None:
    case = data.draw(_cases(stage.gw_addr))
    stage.taken.clear()
    acks = stage.send(case.messages)
    problem = _header_problem(case.header)
    if problem is not None:
        event("header refused: " + problem[0].split(":")[1].split("'")[0].strip()[:30])
        ack = _rejected(acks)
        assert (ack.reason, ack.retryable) == problem
        assert not stage.taken, "allocated for a header it refused"
    else:
        need = sum(m.nbytes for m in case.header.tensors)
        fragment = _body_fragment(case, need)
        event(f"body: {(fragment or 'accepted').split(' after')[0][:20]}")
        if fragment is None:
            assert [pb.Ack.Status.Name(a.status) for a in acks] == ["RECEIVED", "DONE"]
        else:
            ack = _rejected(acks)
            assert ack.reason.startswith("invalid payload: ") and not ack.retryable
            assert fragment in ack.reason, (fragment, ack.reason)
        assert all(n <= BOUND for n in stage.taken)
    assert_still_serves(stage)


# ------------------------------------------------------------------------ the extremes


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([], "stream ended before a WorkHeader"),
        (_serialize([pb.WorkChunk(data=b"\0" * 8)]), "stream must start with a WorkHeader"),
        (_serialize([pb.WorkChunk()]), "stream must start with a WorkHeader"),
        *[([raw], "the first message is not a WorkChunk") for raw in GARBAGE],
    ],
)
def test_a_stream_without_a_header_first_is_refused(
    stage: Stage, messages: list[bytes], reason: str
) -> None:
    stage.taken.clear()
    ack = _rejected(stage.send(messages))
    assert ack.reason.startswith(f"invalid payload: {reason}") and not ack.retryable
    assert not stage.taken
    assert_still_serves(stage)


def test_a_million_dimensions_are_refused_at_once(stage: Stage) -> None:
    """math.prod of 1.5M 63-bit dimensions would hold the stage's event loop for hours."""
    header = pb.WorkHeader(
        request_id=f"dims-{next(_ids)}",
        tensors=[
            pb.TensorMeta(
                name="x", shape=[2**62] * 1_500_000, dtype="uint8", nbytes=1, location=pb.INLINE
            )
        ],
    )
    started = time.monotonic()
    ack = _rejected(stage.send(_serialize([pb.WorkChunk(header=header)])))
    assert time.monotonic() - started < 5.0
    assert "1500000 dimensions, over 16" in ack.reason
    assert_still_serves(stage)


def test_a_huge_declared_size_is_refused_before_anything_is_allocated(stage: Stage) -> None:
    stage.taken.clear()
    meta = pb.TensorMeta(
        name="x", shape=[2**30, 2**30], dtype="float32", nbytes=2**62, location=pb.INLINE
    )
    header = pb.WorkHeader(request_id=f"huge-{next(_ids)}", tensors=[meta])
    ack = _rejected(stage.send(_serialize([pb.WorkChunk(header=header)])))
    assert ack.reason == (
        f"invalid payload: payload declares at least {2**62} bytes; "
        f"this receiver takes at most {BOUND}"
    )
    assert not ack.retryable and not stage.taken
    # just over the bound, split over tensors, is refused the same way
    half = BOUND // 2 + 1
    metas = [
        pb.TensorMeta(name=n, shape=[half], dtype="uint8", nbytes=half, location=pb.INLINE)
        for n in "ab"
    ]
    header = pb.WorkHeader(request_id=f"huge-{next(_ids)}", tensors=metas)
    assert (
        "takes at most" in _rejected(stage.send(_serialize([pb.WorkChunk(header=header)]))).reason
    )
    assert not stage.taken
    assert_still_serves(stage)


def test_a_message_over_grpcs_limit_is_refused_by_grpc(stage: Stage) -> None:
    header = header_of(_valid_payload(f"big-{next(_ids)}", stage.gw_addr))
    messages = [pb.WorkChunk(header=header).SerializeToString(), b"\x12" + b"\x00" * (17 << 20)]
    with pytest.raises(grpc.RpcError) as info:
        stage.send(messages)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serves(stage)


def test_the_decoder_names_a_message_that_is_not_a_workchunk() -> None:
    for raw in GARBAGE:
        parsed = parse_chunk(raw)
        assert isinstance(parsed, MalformedChunk) and f"({len(raw)} bytes)" in parsed.error
    chunk = parse_chunk(pb.WorkChunk(data=b"abc").SerializeToString())
    assert not isinstance(chunk, MalformedChunk) and bytes(chunk.data) == b"abc"
