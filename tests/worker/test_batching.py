"""Dynamic batching and queue order in the stage runtime (real gRPC, a fake model).

The model here records which requests shared a call; its batch key is the
request's width, so tests choose who may batch with whom.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass, replace

import pytest
import torch

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.params import GenerationParams
from disagfusion.worker.runtime.batching import Outcome, Request
from disagfusion.worker.runtime.payload import Payload
from tests.worker.runtime_harness import (
    Cluster,
    FakeCompute,
    FakeGateway,
    Stage,
    metric,
    payload,
    status,
    wait_until,
)


class BadInput(ValueError):
    pass


class FakeBatchCompute(FakeCompute):
    """Batches by width; the prompt "bad*" fails validation alone; "boom" breaks
    any call it is in (so only a retry one by one isolates it)."""

    def __init__(self, block_first: bool = True) -> None:
        super().__init__(block=block_first)
        self.batches: list[list[str]] = []
        self.first = asyncio.Event()

    def batch_key(self, params: GenerationParams, tensors: dict[str, torch.Tensor]) -> Hashable:
        return params.width

    def default_max_batch(self) -> int:
        return 4

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        rids = [p.prompt for p, _ in requests]
        self.batches.append(rids)
        if len(self.batches) == 1 and self.block:
            self.active.add(rids[0])
            try:
                if not self._gate(rids[0]).wait(30):
                    raise RuntimeError("never released")
            finally:
                self.active.discard(rids[0])
        out: list[Outcome] = []
        for params, tensors in requests:
            if params.prompt.startswith("bad"):
                out.append(BadInput(f"{params.prompt} is bad"))
            else:
                out.append({"out": tensors["x"] * 2 + params.seed})
        return out


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    yield c
    await c.close()


def _p(rid: str, reply_to: str, width: int = 64, seed: int = 0, slo: float = 0.0) -> Payload:
    base = payload(rid, reply_to)
    return replace(
        base,
        params=replace(base.params, width=width, seed=seed),
        slo_deadline_unix=slo,
    )


@dataclass
class Blocked:
    """A stage computing "first" until released, with a gateway for results."""

    stage: Stage
    compute: FakeBatchCompute
    gw: FakeGateway
    gw_addr: str

    @property
    def addr(self) -> str:
        return self.stage.addr


async def _start_blocked(
    cluster: Cluster, max_batch: int | None = None, queue_order: str = "fifo"
) -> Blocked:
    compute = FakeBatchCompute()
    gw, gw_addr = await cluster.gateway()
    stage = await cluster.stage(
        compute, queue_capacity=8, max_batch=max_batch, queue_order=queue_order
    )
    first = cluster.submit(stage.addr, _p("first", gw_addr))
    assert status(await first.ack()) == "RECEIVED"
    await wait_until(lambda: compute.batches, "the first request to start")
    return Blocked(stage, compute, gw, gw_addr)


async def _queue(cluster: Cluster, addr: str, payloads: list[Payload]) -> None:
    for p in payloads:
        stream = cluster.submit(addr, p)
        assert status(await stream.ack()) == "RECEIVED"


async def test_queued_requests_with_the_head_s_key_share_one_call(cluster: Cluster) -> None:
    b = await _start_blocked(cluster, max_batch=3)
    await _queue(
        cluster,
        b.addr,
        [
            _p("a1", b.gw_addr, width=64),
            _p("b1", b.gw_addr, width=128),
            _p("a2", b.gw_addr, width=64),
            _p("a3", b.gw_addr, width=64),
            _p("a4", b.gw_addr, width=64),
        ],
    )
    b.compute.release("first")
    await wait_until(lambda: len(b.gw.results) == 6, "every result")
    # The head's key first (up to max_batch), in arrival order; then the rest.
    assert b.compute.batches == [["first"], ["a1", "a2", "a3"], ["b1"], ["a4"]]
    runtime = b.stage.runtime
    assert metric(runtime, "disagfusion_stage_batch_size_count") == 4
    assert metric(runtime, "disagfusion_stage_batch_size_sum") == 6
    assert metric(runtime, "disagfusion_stage_max_batch") == 3


async def test_each_request_keeps_its_own_result_and_error(cluster: Cluster) -> None:
    b = await _start_blocked(cluster, max_batch=4)
    await _queue(
        cluster,
        b.addr,
        [_p("ok1", b.gw_addr, seed=1), _p("bad1", b.gw_addr, seed=2), _p("ok2", b.gw_addr, seed=3)],
    )
    b.compute.release("first")
    await wait_until(lambda: len(b.gw.results) == 4, "every outcome")
    assert b.compute.batches[1] == ["ok1", "bad1", "ok2"]
    (bad,) = b.gw.of("bad1")
    assert bad.error_code == 400 and "bad1 is bad" in bad.error
    for rid, seed in (("ok1", 1), ("ok2", 3)):
        (ok,) = b.gw.of(rid)
        assert not ok.error
        assert torch.equal(ok.tensors["out"], torch.arange(4, dtype=torch.float32) * 2 + seed)


async def test_max_batch_one_serves_one_request_per_call(cluster: Cluster) -> None:
    b = await _start_blocked(cluster, max_batch=1)
    await _queue(cluster, b.addr, [_p(f"a{i}", b.gw_addr) for i in range(3)])
    b.compute.release("first")
    await wait_until(lambda: len(b.gw.results) == 4, "every result")
    assert b.compute.batches == [["first"], ["a0"], ["a1"], ["a2"]]


async def test_the_model_default_applies_without_max_batch(cluster: Cluster) -> None:
    b = await _start_blocked(cluster)  # FakeBatchCompute's default: 4
    await _queue(cluster, b.addr, [_p(f"a{i}", b.gw_addr) for i in range(5)])
    b.compute.release("first")
    await wait_until(lambda: len(b.gw.results) == 6, "every result")
    assert [len(batch) for batch in b.compute.batches] == [1, 4, 1]
    # A batch must be able to form: the queue holds at least one.
    health = await cluster.stub(b.addr).Health(pb.HealthRequest())
    assert health.queue_capacity >= 4


async def test_batch_wait_lets_a_batch_fill(cluster: Cluster) -> None:
    compute = FakeBatchCompute(block_first=False)
    gw, gw_addr = await cluster.gateway()
    stage = await cluster.stage(compute, queue_capacity=4, max_batch=2, batch_wait_s=2.0)
    await _queue(cluster, stage.addr, [_p("a1", gw_addr)])
    await asyncio.sleep(0.3)
    assert compute.batches == []  # still waiting for a batch-mate
    await _queue(cluster, stage.addr, [_p("a2", gw_addr)])
    await wait_until(lambda: len(gw.results) == 2, "both results")
    assert compute.batches == [["a1", "a2"]]
    waited = metric(stage.runtime, "disagfusion_stage_batch_wait_seconds_sum")
    assert waited is not None and 0.2 < waited < 2.0


async def test_batch_wait_ends_at_its_bound(cluster: Cluster) -> None:
    compute = FakeBatchCompute(block_first=False)
    gw, gw_addr = await cluster.gateway()
    stage = await cluster.stage(compute, max_batch=4, batch_wait_s=0.2)
    await _queue(cluster, stage.addr, [_p("alone", gw_addr)])
    await wait_until(lambda: len(gw.results) == 1, "the result")
    assert compute.batches == [["alone"]]


async def test_edf_serves_the_earliest_slo_deadline_first(cluster: Cluster) -> None:
    b = await _start_blocked(cluster, max_batch=1, queue_order="edf")
    now = 1_000_000.0
    await _queue(
        cluster,
        b.addr,
        [
            _p("late", b.gw_addr, slo=now + 30),
            _p("soon", b.gw_addr, slo=now + 10),
            _p("none", b.gw_addr),  # no SLO: arrival + the aging bound
            _p("sooner", b.gw_addr, slo=now + 5),
        ],
    )
    b.compute.release("first")
    await wait_until(lambda: len(b.gw.results) == 5, "every result")
    assert b.compute.batches[1:] == [["sooner"], ["soon"], ["late"], ["none"]]


async def test_fifo_ignores_deadlines(cluster: Cluster) -> None:
    b = await _start_blocked(cluster, max_batch=1, queue_order="fifo")
    await _queue(
        cluster,
        b.addr,
        [_p("x", b.gw_addr, slo=30.0), _p("y", b.gw_addr, slo=10.0)],
    )
    b.compute.release("first")
    await wait_until(lambda: len(b.gw.results) == 3, "every result")
    assert b.compute.batches[1:] == [["x"], ["y"]]


async def test_an_expired_request_fails_alone_in_its_batch(cluster: Cluster) -> None:
    b = await _start_blocked(cluster, max_batch=4)
    expired = replace(_p("expired", b.gw_addr), deadline_unix=1.0)
    await _queue(cluster, b.addr, [_p("fine", b.gw_addr), expired])
    b.compute.release("first")
    await wait_until(lambda: len(b.gw.results) == 3, "every outcome")
    (late,) = b.gw.of("expired")
    assert late.error_code == 504
    assert b.compute.batches[1] == ["fine"]
