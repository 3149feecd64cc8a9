"""The stage runtime in-process: overlap, custody and re-send, duplicates, errors,
drain and metrics, on real gRPC servers with fake compute (tests/worker/runtime_harness.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.metrics import HandoffMetrics
from disagfusion.worker.runtime import sender as sender_module
from disagfusion.worker.runtime.payload import (
    Payload,
    header_of,
)
from disagfusion.worker.runtime.peers import ChannelCache, PeerPool
from disagfusion.worker.runtime.sender import Sender
from tests.worker.runtime_harness import (
    HOST,
    PIPELINE,
    ROLE,
    WAIT_S,
    Cluster,
    FakeCompute,
    free_port,
    metric,
    payload,
    rejected,
    status,
    wait_until,
)


async def test_overlap_receives_next_payload_and_hands_off_while_computing(
    cluster: Cluster,
) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute)

    a = cluster.submit(stage.addr, payload("A", gw_addr))
    assert status(await a.ack()) == "RECEIVED"
    await wait_until(lambda: compute.active == {"A"}, "A computing")

    # B's bytes are received and queued while A still computes.
    b = cluster.submit(stage.addr, payload("B", gw_addr))
    assert status(await b.ack()) == "RECEIVED"
    assert compute.active == {"A"}
    health = await cluster.stub(stage.addr).Health(pb.HealthRequest())
    assert (health.queue_depth, health.in_flight) == (1, 2)

    # A's output leaves for the gateway while B computes.
    compute.release("A")
    await wait_until(lambda: gw.of("A"), "A's output at the gateway")
    assert status(await a.ack()) == "DONE"
    await wait_until(lambda: compute.active == {"B"}, "B computing")
    assert not gw.of("B")

    compute.release("B")
    assert await b.rest() == ["DONE"]
    assert compute.calls == ["A", "B"]
    assert torch.equal(gw.of("A")[0].tensors["out"], torch.arange(4, dtype=torch.float32) * 2)
    assert gw.of("A")[0].source_stage == ROLE


async def test_overlap_off_rejects_a_second_payload_as_busy_until_the_first_is_handed_off(
    cluster: Cluster,
) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute, overlap=False)

    a = cluster.submit(stage.addr, payload("A", gw_addr))
    assert status(await a.ack()) == "RECEIVED"
    await wait_until(lambda: compute.active == {"A"}, "A computing")

    b = cluster.submit(stage.addr, payload("B", gw_addr))
    ack = await b.ack()
    assert (status(ack), ack.reason, ack.retryable) == ("REJECTED", "busy", True)
    assert await b.rest() == []

    compute.release("A")
    assert await a.rest() == ["DONE"]
    assert gw.of("A")

    b = cluster.submit(stage.addr, payload("B", gw_addr))
    assert status(await b.ack()) == "RECEIVED"
    compute.release("B")
    assert await b.rest() == ["DONE"]
    assert compute.calls == ["A", "B"]
    assert len(gw.results) == 2


async def test_overlap_off_sender_retries_a_busy_worker_until_it_takes_the_payload(
    cluster: Cluster,
) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute, overlap=False)
    sender, pool = cluster.sender([stage.addr])
    await wait_until(lambda: pool.ready_count() == 1, "worker ready in the pool")

    await sender.hand_off(payload("A", gw_addr))
    await wait_until(lambda: compute.active == {"A"}, "A computing")
    handing_b = asyncio.create_task(sender.hand_off(payload("B", gw_addr)))
    await wait_until(lambda: rejected(stage, "busy") >= 1, "B refused as busy")
    assert not handing_b.done()

    compute.release("A")
    await asyncio.wait_for(handing_b, WAIT_S)
    compute.release("B")
    await wait_until(lambda: gw.of("B"), "B at the gateway")
    assert await sender.drain(WAIT_S)
    assert compute.calls == ["A", "B"]
    assert [p.request_id for p in gw.results] == ["A", "B"]


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "one-by-one"])
async def test_sender_spreads_work_across_instances(cluster: Cluster, concurrent: bool) -> None:
    _, gw_addr = await cluster.gateway()
    computes = [FakeCompute(block=True), FakeCompute(block=True)]
    stages = [await cluster.stage(c) for c in computes]
    sender, pool = cluster.sender([s.addr for s in stages])
    await wait_until(lambda: pool.ready_count() == 2, "both workers ready in the pool")

    first = [payload("p1", gw_addr), payload("p2", gw_addr)]
    if concurrent:
        await asyncio.gather(*(sender.hand_off(p) for p in first))
    else:
        for p in first:
            await sender.hand_off(p)
    await wait_until(lambda: sum(len(c.calls) for c in computes) == 2, "both computing")
    assert [len(c.calls) for c in computes] == [1, 1], "one instance idles while one has work"

    # Two more: each instance queues one behind its computing request.
    for p in (payload("p3", gw_addr), payload("p4", gw_addr)):
        await sender.hand_off(p)
    assert [metric(s.runtime, "disagfusion_stage_queue_depth") for s in stages] == [1, 1]


# ----------------------------------------------------------------------------- custody


async def test_payload_is_redelivered_when_the_receiving_instance_dies(cluster: Cluster) -> None:
    gw, gw_addr = await cluster.gateway()
    dying = await cluster.stage(FakeCompute(block=True))
    spare_port = free_port()
    sender, pool = cluster.sender([dying.addr, f"{HOST}:{spare_port}"])
    await wait_until(lambda: pool.ready_count() == 1, "first worker ready")

    await sender.hand_off(payload("R", gw_addr))
    await wait_until(lambda: dying.compute.active == {"R"}, "R computing on the first worker")
    assert sender.held == 1  # received downstream, kept until DONE

    spare = await cluster.stage(FakeCompute(), port=spare_port)
    await wait_until(lambda: pool.ready_count() == 2, "spare worker ready")
    await dying.server.stop(0)

    await wait_until(lambda: gw.of("R"), "R delivered by the spare worker")
    assert await sender.drain(WAIT_S)
    assert sender.held == 0
    assert spare.compute.calls == ["R"]
    assert len(gw.of("R")) == 1
    assert not gw.of("R")[0].error


# ----------------------------------------------------------------------------- duplicates


async def test_duplicate_submissions_are_computed_once_and_all_end_done(cluster: Cluster) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute)

    first = cluster.submit(stage.addr, payload("D", gw_addr))
    assert status(await first.ack()) == "RECEIVED"
    await wait_until(lambda: compute.active == {"D"}, "D computing")
    while_computing = cluster.submit(stage.addr, payload("D", gw_addr))
    assert status(await while_computing.ack()) == "RECEIVED"

    compute.release("D")
    assert await first.rest() == ["DONE"]
    assert await while_computing.rest() == ["DONE"]

    after_finish = cluster.submit(stage.addr, payload("D", gw_addr))
    assert await after_finish.rest() == ["RECEIVED", "DONE"]

    assert compute.calls == ["D"]
    assert len(gw.of("D")) == 1
    assert metric(stage.runtime, "disagfusion_stage_duplicates_total") == 2


async def test_duplicate_that_joined_a_copy_which_never_arrives_is_delivered_again(
    cluster: Cluster,
) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute()
    stage = await cluster.stage(compute)
    p = payload("H", gw_addr)

    # The first copy stalls half-way: its sender is about to die.
    first = cluster.submit(stage.addr, p, chunks=[pb.WorkChunk(data=b"\0" * 8)], finish=False)
    await wait_until(
        lambda: metric(stage.runtime, "disagfusion_stage_in_flight") == 1, "first copy arriving"
    )
    sender, pool = cluster.sender([stage.addr])
    await wait_until(lambda: pool.ready_count() == 1, "worker ready in the pool")
    await sender.hand_off(p)  # a retry from elsewhere joins the copy being received
    assert metric(stage.runtime, "disagfusion_stage_duplicates_total") == 1

    await first.close()
    await wait_until(lambda: gw.of("H"), "H computed from the second copy")
    assert await sender.drain(WAIT_S)
    assert compute.calls == ["H"]
    assert len(gw.of("H")) == 1


async def test_sender_close_ends_custody_even_when_grpc_absorbs_the_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """grpc.aio can swallow a task's cancellation while a call starts or fails; the
    attempt then just returns BROKEN. close() must still end the custody task."""
    attempts = 0

    async def absorbing_attempt(
        self: Sender, address: str, p: Payload, received: asyncio.Future[None]
    ) -> tuple[object, str]:
        nonlocal attempts
        attempts += 1
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return sender_module._Outcome.BROKEN, "absorbed"

    monkeypatch.setattr(Sender, "_attempt", absorbing_attempt)
    channels = ChannelCache()
    sender = Sender("x", channels, HandoffMetrics(CollectorRegistry(), "x", PIPELINE))
    handing = asyncio.create_task(sender.hand_off(payload("C", f"{HOST}:1")))
    await wait_until(lambda: attempts == 1, "the first attempt")

    closing = asyncio.create_task(sender.close())
    done, _ = await asyncio.wait({closing}, timeout=WAIT_S)
    handing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await handing
    assert done, "Sender.close() hangs on a custody task whose cancel was absorbed"
    assert sender.held == 0
    await channels.close()


async def test_peer_pool_stop_ends_polling_even_when_grpc_absorbs_the_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cancelled health call may surface as an RPC error instead of CancelledError."""
    calls = 0

    class AbsorbingStub:
        async def Health(self, request: pb.HealthRequest, timeout: float) -> pb.HealthReply:
            nonlocal calls
            calls += 1
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
            )

    channels = ChannelCache()
    monkeypatch.setattr(channels, "stub", lambda address: AbsorbingStub())
    pool = PeerPool("next", [f"{HOST}:1"], channels, poll_interval_s=0.01)
    pool.start()
    await wait_until(lambda: calls == 1, "the first health call")
    stopping = asyncio.create_task(pool.stop())
    done, _ = await asyncio.wait({stopping}, timeout=WAIT_S)
    assert done, "PeerPool.stop() hangs on a poll whose cancel was absorbed"


# ----------------------------------------------------------------------------- errors


class BadInput(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "code", "text"),
    [
        (BadInput("prompt is too long for this model"), 400, "prompt is too long"),
        (RuntimeError("out of memory: boom"), 500, "boom"),
        (ValueError("a ValueError is not this model's input error"), 500, "not this model"),
    ],
    ids=["input-error", "crash", "other-value-error"],
)
async def test_compute_errors_end_the_request_at_the_gateway(
    cluster: Cluster, error: Exception, code: int, text: str
) -> None:
    gw, gw_addr = await cluster.gateway()
    stage = await cluster.stage(FakeCompute(error=error), input_error=BadInput)

    s = cluster.submit(stage.addr, payload("E", gw_addr))
    assert await s.rest() == ["RECEIVED", "DONE"]
    [result] = gw.of("E")
    assert result.error_code == code
    assert text in result.error
    assert result.tensors == {}
    assert result.source_stage == ROLE
    reason = "bad_input" if code == 400 else "error"
    assert metric(stage.runtime, "disagfusion_stage_requests_failed_total", reason=reason) == 1


async def test_passed_deadline_ends_with_504_without_computing(cluster: Cluster) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute()
    stage = await cluster.stage(compute)

    s = cluster.submit(stage.addr, payload("late", gw_addr, deadline_unix=time.time() - 1.0))
    assert await s.rest() == ["RECEIVED", "DONE"]
    [result] = gw.of("late")
    assert result.error_code == 504
    assert "deadline" in result.error
    assert compute.calls == []


def _bad_nbytes(p: Payload) -> pb.WorkHeader:
    h = header_of(p)
    h.tensors[0].nbytes += 4
    return h


@pytest.mark.parametrize(
    ("make_header", "make_chunks", "reason"),
    [
        (_bad_nbytes, None, "nbytes"),
        (header_of, lambda p: [pb.WorkChunk(data=b"\0" * 8)], "ended after 8 of 16 bytes"),
        (header_of, lambda p: [pb.WorkChunk(data=b"\0" * 20)], "more than the 16 bytes"),
    ],
    ids=["nbytes-mismatch", "short-stream", "overlong-stream"],
)
async def test_invalid_payload_is_rejected_for_good_and_the_worker_keeps_serving(
    cluster: Cluster,
    make_header: Callable[[Payload], pb.WorkHeader],
    make_chunks: Callable[[Payload], list[pb.WorkChunk]] | None,
    reason: str,
) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute()
    stage = await cluster.stage(compute)

    bad = payload("bad", gw_addr)
    s = cluster.submit(
        stage.addr,
        bad,
        header=make_header(bad),
        chunks=None if make_chunks is None else make_chunks(bad),
    )
    ack = await s.ack()
    assert (status(ack), ack.retryable) == ("REJECTED", False)
    assert reason in ack.reason
    assert await s.rest() == []
    assert rejected(stage, "invalid") == 1

    good = cluster.submit(stage.addr, payload("good", gw_addr))
    assert await good.rest() == ["RECEIVED", "DONE"]
    assert compute.calls == ["good"]
    assert [p.request_id for p in gw.results] == ["good"]
    health = await cluster.stub(stage.addr).Health(pb.HealthRequest())
    assert (health.queue_depth, health.in_flight, health.completed_total) == (0, 0, 1)


# ----------------------------------------------------------------------------- draining


async def test_drain_refuses_new_work_and_finishes_held_work(cluster: Cluster) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute)
    stub = cluster.stub(stage.addr)

    a = cluster.submit(stage.addr, payload("A", gw_addr))
    assert status(await a.ack()) == "RECEIVED"
    await wait_until(lambda: compute.active == {"A"}, "A computing")

    draining = asyncio.create_task(stage.runtime.drain())
    await wait_until(lambda: stage.runtime.draining, "drain to start")
    b = cluster.submit(stage.addr, payload("B", gw_addr))
    ack = await b.ack()
    assert (status(ack), ack.reason, ack.retryable) == ("REJECTED", "draining", True)
    health = await stub.Health(pb.HealthRequest())
    assert (health.draining, health.ready, health.in_flight) == (True, False, 1)
    assert metric(stage.runtime, "disagfusion_stage_ready") == 0
    assert not draining.done()

    compute.release("A")
    assert await asyncio.wait_for(draining, WAIT_S) is True
    assert await a.rest() == ["DONE"]
    assert [p.request_id for p in gw.results] == ["A"]
    assert compute.calls == ["A"]


# ----------------------------------------------------------------------------- metrics


async def test_metrics_count_completed_requests_and_handoff_bytes(cluster: Cluster) -> None:
    gw, gw_addr = await cluster.gateway()
    stage = await cluster.stage(FakeCompute())

    for i in range(3):
        s = cluster.submit(stage.addr, payload(f"m{i}", gw_addr))
        assert await s.rest() == ["RECEIVED", "DONE"]

    assert metric(stage.runtime, "disagfusion_stage_requests_completed_total") == 3
    assert metric(stage.runtime, "disagfusion_stage_service_time_seconds_count") == 3
    assert metric(stage.runtime, "disagfusion_stage_queue_wait_seconds_count") == 3
    received = metric(stage.runtime, "disagfusion_handoff_bytes_total", direction="received")
    sent = metric(stage.runtime, "disagfusion_handoff_bytes_total", direction="sent")
    assert received == 3 * 16
    assert sent == 3 * 16
    assert metric(stage.runtime, "disagfusion_stage_in_flight") == 0
    assert metric(stage.runtime, "disagfusion_stage_ready") == 1
    assert len(gw.results) == 3


async def test_metrics_count_busy_rejections(cluster: Cluster) -> None:
    _, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute, overlap=False)

    a = cluster.submit(stage.addr, payload("A", gw_addr))
    assert status(await a.ack()) == "RECEIVED"
    b = cluster.submit(stage.addr, payload("B", gw_addr))
    assert status(await b.ack()) == "REJECTED"
    assert rejected(stage, "busy") == 1
    assert rejected(stage, "invalid") == 0
    assert metric(stage.runtime, "disagfusion_stage_in_flight") == 1
    compute.release("A")
    assert await a.rest() == ["DONE"]
    assert metric(stage.runtime, "disagfusion_stage_requests_completed_total") == 1


# ----------------------------------------------------------------------------- gateway


@pytest.mark.parametrize("source", ["encoder", "gateway", "decoder", ""])
async def test_a_stage_takes_work_only_from_its_upstream(cluster: Cluster, source: str) -> None:
    """The decoder's upstream is the denoiser: a submission naming anyone else (a pod
    skipping the pipeline's order, or the gateway's own admission) is refused for good."""
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute()
    stage = await cluster.stage(compute)
    forged = replace(payload("forged", gw_addr), source_stage=source)
    s = cluster.submit(stage.addr, forged)
    ack = await s.ack()
    assert (status(ack), ack.retryable) == ("REJECTED", False)
    assert "only from denoiser" in ack.reason
    assert rejected(stage, "sender") == 1
    assert compute.calls == []
    good = cluster.submit(stage.addr, payload("good", gw_addr))
    assert await good.rest() == ["RECEIVED", "DONE"]
    assert [p.request_id for p in gw.results] == ["good"]


async def test_a_cancel_drops_a_queued_request_and_skips_it_when_it_comes_again(
    cluster: Cluster,
) -> None:
    gw, gw_addr = await cluster.gateway()
    compute = FakeCompute(block=True)
    stage = await cluster.stage(compute)
    a = cluster.submit(stage.addr, payload("A", gw_addr))
    assert status(await a.ack()) == "RECEIVED"
    await wait_until(lambda: compute.active == {"A"}, "A computing")
    b = cluster.submit(stage.addr, payload("B", gw_addr))
    assert status(await b.ack()) == "RECEIVED"  # queued behind A
    stub = cluster.stub(stage.addr)
    health = await stub.Health(pb.HealthRequest())
    assert (health.queue_depth, health.in_flight) == (1, 2)

    assert (await stub.Cancel(pb.CancelRequest(request_id="B"))).held
    assert not (await stub.Cancel(pb.CancelRequest(request_id="nobody"))).held
    health = await stub.Health(pb.HealthRequest())
    assert (health.queue_depth, health.in_flight) == (0, 1)
    assert await b.rest() == ["DONE"]  # custody released: its sender is done with it
    # A copy of B still in transit (a sender's retry) is acknowledged, not computed.
    again = cluster.submit(stage.addr, payload("B", gw_addr))
    assert await again.rest() == ["RECEIVED", "DONE"]
    compute.release("A")
    await wait_until(lambda: gw.of("A"), "A at the gateway")
    assert compute.calls == ["A"]
    assert not gw.of("B")
