"""The transport seam wired into the stage runtime, the sender and the CLI.

Each backend's own behaviour (round trips across processes, forged handles,
dead peers) is tested in test_transport_<name>.py; here: what the runtime
does with them — which backend a sender picks and when it falls back to grpc,
what a stage advertises in Health, what it does with a descriptor it must not
trust — in-process with real gRPC, and then `serve --local --transport NAME`
as a user runs it, killed with -9 under load.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client import CollectorRegistry

from disagfusion.cli.common import TRANSPORTS as CLI_TRANSPORTS
from disagfusion.operator.spec import TRANSPORT_OPTIONS
from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.gateway.client import generate_in_process
from disagfusion.worker.metrics import HandoffMetrics
from disagfusion.worker.runtime.payload import Payload, header_of
from disagfusion.worker.transport import BACKENDS, backend_class, open_backend
from disagfusion.worker.transport.base import DescriptorError, Peer, TransferError
from disagfusion.worker.transport.wire import Transports
from tests.worker.cluster_utils import metric_value, scrape
from tests.worker.runtime_harness import PIPELINE, Cluster, FakeCompute, payload, status
from tests.worker.serve_local import ServeLocal, is_ready, wait_until

HAVE_NIXL = importlib.util.find_spec("nixl_cu12") is not None


def _importable(name: str) -> bool:
    try:
        backend_class(name)
    except Exception:
        return False
    return True


# ---------------------------------------------------------------------- registry


def test_every_place_that_names_transports_names_the_same() -> None:
    """The worker's registry, the CLI's --transport choices and the CRD's options table."""
    assert list(BACKENDS) == list(CLI_TRANSPORTS) == list(TRANSPORT_OPTIONS)
    for name in BACKENDS:
        if not _importable(name):
            continue
        assert set(backend_class(name).option_help) == set(TRANSPORT_OPTIONS[name]), name


def test_an_unknown_option_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="no option bogus"):
        open_backend("grpc", {"bogus": "1"})
    with pytest.raises(ValueError, match="unknown transport 'pigeon'"):
        open_backend("pigeon")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--transport", "shm", "--transport-option", "bogus=1"], "no option bogus"),
        (["--transport-option", "novalue"], "expected KEY=VALUE"),
        (["--transport", "pigeon"], "invalid choice: 'pigeon'"),
    ],
)
def test_the_worker_cli_refuses_bad_transport_flags(flags: list[str], message: str) -> None:
    argv = [sys.executable, "-m", "disagfusion", "worker", "--stage", "decoder"]
    argv += ["--port", "1", "--http-port", "2", *flags]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr


# ---------------------------------------------------------------------- choice


def test_a_sender_uses_its_transport_only_where_the_receiver_can_take_it(
    tmp_path: Path,
) -> None:
    transports = Transports.open("shm", {"dir": str(tmp_path)})
    here = transports.preferred.endpoint()
    assert transports.names == ["grpc", "shm"]
    assert transports.choose(Peer("h:1"))[1] == "not_accepted"
    other_host = Peer("h:1", frozenset({"grpc", "shm"}), {"shm": "another-host:1:2"})
    assert transports.choose(other_host) == (transports.grpc, "unreachable")
    same_host = Peer("h:1", frozenset({"grpc", "shm"}), {"shm": here})
    assert transports.choose(same_host) == (transports.preferred, "")
    grpc_only = Transports.open("grpc")
    assert grpc_only.choose(same_host) == (grpc_only.preferred, "")
    # A payload too small to be worth a segment goes inline, by design: no fallback.
    small = transports.preferred.inline_below - 1
    assert transports.choose(same_host, small) == (transports.grpc, "")
    assert transports.choose(same_host, small + 1) == (transports.preferred, "")


def test_a_receiver_refuses_tensors_in_a_location_it_does_not_accept() -> None:
    transports = Transports.open("grpc")
    nixl = pb.TensorMeta(name="x", shape=[1], dtype="uint8", nbytes=1, location=pb.NIXL)
    inline = pb.TensorMeta(name="y", shape=[1], dtype="uint8", nbytes=1, location=pb.INLINE)
    with pytest.raises(DescriptorError, match="NIXL not accepted here"):
        transports.for_metas([nixl])
    with pytest.raises(DescriptorError, match="one transport"):
        transports.for_metas([inline, nixl])
    assert transports.for_metas([]) is transports.grpc


# ---------------------------------------------------------------------- the runtime


def _handoff(metrics: HandoffMetrics, name: str, **labels: str) -> float:
    for family in metrics.bytes, metrics.fallbacks:
        for metric in family.collect():
            for sample in metric.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return sample.value
    return 0.0


def _big_payload(rid: str, reply_to: str) -> Payload:
    p = payload(rid, reply_to)
    p.tensors = {
        "x": torch.linspace(0, 1, 300_000),
        "mask": torch.arange(1001, dtype=torch.int64) % 3 == 0,
        "half": torch.randn(7, 33).to(torch.bfloat16),
    }
    return p


class _Keep(FakeCompute):
    def __init__(self) -> None:
        super().__init__()
        self.inputs: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, params: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.inputs[params.prompt] = {k: v.clone() for k, v in tensors.items()}
        return {"out": tensors["x"][:4] * 2}


def _stage_metric(stage: Any, name: str, **labels: str) -> float:
    return _handoff(stage.runtime.metrics.handoff, name, stage="decoder", **labels)


@pytest.mark.parametrize("backend", ["shm", "torch"])
async def test_a_stage_accepts_and_advertises_its_transport_and_gets_the_bytes(
    cluster: Cluster, tmp_path: Path, backend: str
) -> None:
    options = {"dir": str(tmp_path)} if backend == "shm" else {}
    _, gw_addr = await cluster.gateway()
    compute = _Keep()
    stage = await cluster.stage(compute, transport=backend, transport_options=options)
    health = await cluster.stub(stage.addr).Health(pb.HealthRequest())
    assert sorted(health.transports) == sorted({"grpc", backend})
    assert health.transport_endpoints[backend]
    metrics = HandoffMetrics(CollectorRegistry(), "upstream", PIPELINE)
    transports = Transports.open(backend, options)
    sender, pool = cluster.sender([stage.addr], transports, metrics)
    await _ready(pool)
    sent = [_big_payload(f"r{i}", gw_addr) for i in range(3)]
    for p in sent:
        await sender.hand_off(p)
    assert await sender.drain(10.0)
    for p in sent:
        got = compute.inputs[p.request_id]
        assert got.keys() == p.tensors.keys()
        for name, t in p.tensors.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    nbytes = sum(p.nbytes for p in sent)
    name = "disagfusion_handoff_bytes_total"
    assert _handoff(metrics, name, direction="sent", transport=backend) == nbytes
    assert _stage_metric(stage, name, direction="received", transport=backend) == nbytes
    assert _handoff(metrics, "disagfusion_handoff_fallbacks_total") == 0
    if backend == "shm":
        # One segment, reused for each hand-off in turn; unlinked at close.
        assert len(list(tmp_path.iterdir())) == 1
        await transports.close()
        assert list(tmp_path.iterdir()) == []


async def _ready(pool: Any) -> None:
    from tests.worker.runtime_harness import wait_until as wait

    await wait(lambda: pool.ready_count() == 1, "the stage to answer Health")


async def test_a_sender_falls_back_to_grpc_for_a_receiver_without_its_transport(
    cluster: Cluster, tmp_path: Path
) -> None:
    _, gw_addr = await cluster.gateway()
    compute = _Keep()
    stage = await cluster.stage(compute)  # grpc only
    metrics = HandoffMetrics(CollectorRegistry(), "upstream", PIPELINE)
    transports = Transports.open("shm", {"dir": str(tmp_path)})
    sender, pool = cluster.sender([stage.addr], transports, metrics)
    await _ready(pool)
    p = _big_payload("fallback", gw_addr)
    await sender.hand_off(p)
    assert await sender.drain(10.0)
    assert torch.equal(compute.inputs["fallback"]["x"], p.tensors["x"])
    fallbacks = "disagfusion_handoff_fallbacks_total"
    assert _handoff(metrics, fallbacks, transport="shm", reason="not_accepted") == 1
    name = "disagfusion_handoff_bytes_total"
    assert _handoff(metrics, name, direction="sent", transport="grpc") == p.nbytes
    assert list(tmp_path.iterdir()) == []


async def test_a_publish_that_fails_goes_inline_for_that_attempt(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shared memory full (or a registration refused): the payload still arrives."""
    _, gw_addr = await cluster.gateway()
    compute = _Keep()
    options = {"dir": str(tmp_path)}
    stage = await cluster.stage(compute, transport="shm", transport_options=options)
    metrics = HandoffMetrics(CollectorRegistry(), "upstream", PIPELINE)
    transports = Transports.open("shm", options)

    async def full(*args: object) -> None:
        raise TransferError("No space left on device")

    monkeypatch.setattr(transports.preferred, "publish", full)
    sender, pool = cluster.sender([stage.addr], transports, metrics)
    await _ready(pool)
    p = _big_payload("full", gw_addr)
    await sender.hand_off(p)
    assert await sender.drain(10.0)
    assert torch.equal(compute.inputs["full"]["x"], p.tensors["x"])
    fallbacks = "disagfusion_handoff_fallbacks_total"
    assert _handoff(metrics, fallbacks, transport="shm", reason="publish_failed") == 1


async def test_a_peer_that_stops_answering_is_forgotten_by_the_transports(
    cluster: Cluster,
) -> None:
    """Per-peer transport state (a torch process group) goes with the peer."""
    from disagfusion.worker.runtime.peers import PeerPool
    from tests.worker.runtime_harness import wait_until as wait

    stage = await cluster.stage(_Keep())
    gone: list[str] = []
    pool = PeerPool(
        "next", [stage.addr], cluster.channels, poll_interval_s=0.05, on_gone=gone.append
    )
    pool.start()
    cluster.closers.append(pool.stop)
    await _ready(pool)
    await stage.server.stop(0)
    await wait(lambda: gone == [stage.addr], "the pool to report the peer gone")


async def _submit(cluster: Cluster, addr: str, header: pb.WorkHeader) -> pb.Ack:
    call = cluster.stub(addr).Submit()

    async def one() -> AsyncIterator[pb.WorkChunk]:
        yield pb.WorkChunk(header=header)

    async for chunk in one():
        await call.write(chunk)
    await call.done_writing()
    ack = await call.read()
    call.cancel()
    assert isinstance(ack, pb.Ack)
    return ack


async def test_a_forged_descriptor_is_refused_for_good_and_touches_nothing(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A header naming another request's segment, a path outside the segment
    directory, or garbage: REJECTED, not retryable; the other request's segment
    is still there; the stage keeps serving."""
    _, gw_addr = await cluster.gateway()
    compute = _Keep()
    options = {"dir": str(tmp_path)}
    stage = await cluster.stage(compute, transport="shm", transport_options=options)
    victim = open_backend("shm", options)
    theirs = await victim.publish("someone-else", {"x": torch.ones(8)}, Peer(stage.addr))
    [segment] = list(tmp_path.iterdir())

    def forged(handle: bytes, location: int = pb.SHM) -> pb.WorkHeader:
        header = header_of(payload("forged", gw_addr))
        header.tensors[0].location = location  # type: ignore[assignment]
        header.tensors[0].handle = handle
        return header

    other = forged(theirs.metas[0].handle)
    other.tensors[0].shape[:] = [8]
    other.tensors[0].nbytes = 32
    escape = json.dumps({"segment": "../../etc/passwd", "offset": 64, "nbytes": 16}).encode()
    cases = {
        "another request's segment": other,
        "a path outside the directory": forged(escape),
        "garbage": forged(b"\xff\x00not json"),
    }
    for what, header in cases.items():
        ack = await _submit(cluster, stage.addr, header)
        assert (status(ack), ack.retryable) == ("REJECTED", False), what
        assert "invalid payload" in ack.reason, (what, ack.reason)
    # A transport it does not take: a sender with a stale view of it, retried.
    ack = await _submit(cluster, stage.addr, forged(b"", pb.NIXL))
    assert (status(ack), ack.retryable) == ("REJECTED", True)
    assert "NIXL not accepted here" in ack.reason
    assert segment.exists()  # not read away, not unlinked
    assert compute.inputs == {}
    # The stage still serves a well-formed payload.
    sender, pool = cluster.sender([stage.addr], Transports.open("shm", options))
    await _ready(pool)
    await sender.hand_off(_big_payload("honest", gw_addr))
    assert await sender.drain(10.0)
    assert "honest" in compute.inputs
    await theirs.release()
    await victim.close()


# ---------------------------------------------------------------------- serve --local

BODIES = [
    {"prompt": "a red fox", "seed": 1, "n": 2, "size": "64x64"},
    {"prompt": "a lighthouse", "seed": 2, "size": "128x64", "num_inference_steps": 6},
]
EVERY_PAYLOAD = ("--transport-option", "inline_below=0")
LOCAL_BACKENDS = [
    "shm",
    "torch",
    pytest.param("nixl", marks=pytest.mark.skipif(not HAVE_NIXL, reason="nixl-cu12 missing")),
]


def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url + "/v1/images/generations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _pngs(reply: Any) -> list[np.ndarray]:
    import base64

    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in reply["data"]
    ]


def _segments_of(pids: set[int]) -> list[str]:
    """Shared memory segments in /dev/shm published by any of `pids`."""
    out = []
    for name in os.listdir("/dev/shm"):
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "disagfusion" and int(parts[2]) in pids:
            out.append(name)
    return out


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_serve_local_with_a_transport_serves_the_monolithic_pipelines_images(
    tmp_path: Path, backend: str
) -> None:
    # Every payload by the backend, however small (tiny-unet's are a few KiB).
    with ServeLocal(tmp_path, "--transport", backend, *EVERY_PAYLOAD) as server:
        server.wait_serving()
        denoiser = server.worker("denoiser")
        decoder = server.worker("decoder")
        pids = {p.pid for p in server.children()}
        for body in BODIES:
            status_code, reply = _post(server.url, body)
            assert status_code == 200, reply
            expected = [
                np.asarray(Image.open(io.BytesIO(png)))
                for png in generate_in_process("builtin:tiny-unet", dict(body))
            ]
            got = _pngs(reply)
            assert len(got) == len(expected)
            for g, e in zip(got, expected, strict=True):
                assert np.abs(g.astype(int) - e.astype(int)).max() <= 1, body
        # Embeddings and latents went by the backend, both hops, nothing fell back.
        for child, direction in ((denoiser, "received"), (denoiser, "sent"), (decoder, "received")):
            text = scrape(child.http_url)
            moved = metric_value(
                text, "disagfusion_handoff_bytes_total", direction=direction, transport=backend
            )
            assert moved > 0, (child.role, direction)
            assert metric_value(text, "disagfusion_handoff_fallbacks_total") == 0
        server.signal(signal.SIGTERM)
        assert server.proc.wait(120) == 0, server.output()
    assert _segments_of(pids) == []


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("backend", LOCAL_BACKENDS)
def test_kill_9_of_a_denoiser_under_load_with_a_transport_loses_nothing_and_leaks_nothing(
    tmp_path: Path, backend: str
) -> None:
    """The denoiser is both a receiver (of the encoder's embeddings, maybe mid-fetch)
    and a sender holding custody (of latents the decoder has not finished)."""
    from tests.worker.test_serve_local import Load

    args = ("--transport", backend, *EVERY_PAYLOAD, "--denoisers", "2")
    with ServeLocal(tmp_path, *args) as server:
        server.wait_serving()
        victim = server.worker("denoiser")
        pids = {p.pid for p in server.children()}
        load = Load(server.url, count=10, concurrency=5)
        wait_until(
            "denoiser holding work",
            lambda: metric_value(scrape(victim.http_url), "disagfusion_stage_in_flight") >= 1,
        )
        os.kill(victim.pid, signal.SIGKILL)
        statuses = load.join()
        assert statuses == [200] * 10, [r[:2] for r in load.results if r[0] != 200]
        server.wait_for_line("exited unexpectedly (signal SIGKILL)")
        wait_until("gateway ready again", lambda: is_ready(server.url))
        pids |= {p.pid for p in server.children()}
        # No hung thread keeps any process from exiting on SIGTERM.
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.proc.wait(150) == 0, server.output()
        assert time.monotonic() - started < 150
    assert _segments_of(pids) == []
