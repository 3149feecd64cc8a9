"""End to end with real processes: gateway + stage workers on 127.0.0.1.

These start real model processes (random-weight builtins) and talk HTTP and
gRPC over sockets, as `disagfusion serve --local` does.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from disagfusion.worker.gateway.client import generate_in_process
from disagfusion.worker.local.launcher import LocalCluster
from tests.worker.cluster_utils import (
    decode_pngs,
    generate,
    generate_many,
    metric_value,
    samples,
    scrape,
    start_cluster,
)
from tests.worker.serve_local import ServeLocal, children_of, wait_gone, wait_until

pytestmark = pytest.mark.slow

REQUESTS = [
    {"prompt": "a red fox", "seed": 1, "n": 2, "size": "64x64"},
    {"prompt": "a lighthouse at dusk", "seed": 2, "size": "128x64", "negative_prompt": "blurry"},
    {"prompt": "a bowl of ramen", "seed": 3, "guidance_scale": 1.0, "num_inference_steps": 4},
    {"prompt": "a tiny robot", "seed": 4, "size": "64x128", "num_inference_steps": 12},
    {"prompt": "an old map", "seed": 5},
    {"prompt": "a cat", "seed": 6, "n": 3},
]


@pytest.fixture(scope="module", params=["builtin:tiny-unet", "builtin:tiny-mmdit"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    model = request.param
    c = start_cluster(
        tmp_path_factory.mktemp("logs"), model=model, encoders=2, denoisers=2, decoders=2
    )
    yield c
    c.stop()


def test_disaggregated_output_equals_monolithic_pipeline(cluster: LocalCluster) -> None:
    replies = generate_many(cluster, REQUESTS, concurrency=len(REQUESTS))
    for body, (status, reply) in zip(REQUESTS, replies, strict=True):
        assert status == 200, reply
        got = decode_pngs(reply)
        assert len(got) == body.get("n", 1)
        expected = [
            np.asarray(Image.open(io.BytesIO(png)))
            for png in generate_in_process(cluster.opts.model, dict(body))
        ]
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape
            assert np.abs(g.astype(int) - e.astype(int)).max() <= 1, body
    # Every instance of the slowest stage got work: dispatch spread the burst.
    for child in cluster.workers["denoiser"]:
        done = metric_value(scrape(child.http_url), "disagfusion_stage_requests_completed_total")
        assert done >= 1, f"{child.name} idled through a burst of {len(REQUESTS)} requests"
    total = sum(
        metric_value(scrape(c.http_url), "disagfusion_stage_requests_completed_total")
        for c in cluster.workers["decoder"]
    )
    assert total >= len(REQUESTS)


def test_generate_cli_writes_the_same_png_as_in_process(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    cli = [
        sys.executable,
        "-m",
        "disagfusion",
        "generate",
        "a red fox",
        "--seed",
        "7",
        "--steps",
        "5",
    ]
    remote = tmp_path / "fox.png"
    local = tmp_path / "fox-local.png"
    subprocess.run([*cli, "-o", str(remote), "--url", cluster.url], check=True, timeout=300)
    subprocess.run(
        [*cli, "-o", str(local), "--in-process", "--model", cluster.opts.model],
        check=True,
        timeout=300,
    )
    a, b = np.asarray(Image.open(remote)), np.asarray(Image.open(local))
    assert a.shape == (64, 64, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_bad_requests_get_json_errors_and_workers_survive(cluster: LocalCluster) -> None:
    cases: list[tuple[dict[str, object], int, str]] = [
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": "x", "size": "65x64"}, 400, "size"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": "x", "num_inference_steps": 100000}, 400, "num_inference_steps"),
        ({"prompt": "x" * 5000}, 400, "prompt"),
        ({"prompt": "x", "response_format": "url"}, 400, "response_format"),
        ({"prompt": "x", "model": "dall-e-3"}, 404, "model"),
        ({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale"),
    ]
    for body, status, param in cases:
        got, reply = generate(cluster, body)
        assert got == status, (body, reply)
        assert reply["error"]["param"] == param
        assert reply["error"]["message"]
    for raw, status in ((b"{not json", 400), (b"[1, 2]", 400), (b"x" * (2 << 20), 413)):
        req = urllib.request.Request(
            cluster.url + "/v1/images/generations",
            data=raw,
            headers={"Content-Type": "application/json"},
        )
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError("expected an HTTP error")
        except urllib.error.HTTPError as err:
            assert err.code == status
            assert "error" in json.loads(err.read())
    assert not cluster.exited()
    status, reply = generate(cluster, {"prompt": "still alive", "seed": 9})
    assert status == 200, reply


def test_metrics_are_exported_and_pass_promtool(cluster: LocalCluster) -> None:
    status, _ = generate(cluster, {"prompt": "metrics", "seed": 11})
    assert status == 200
    required_stage = [
        "disagfusion_stage_queue_depth",
        "disagfusion_stage_in_flight",
        "disagfusion_stage_service_time_seconds_count",
        "disagfusion_stage_requests_completed_total",
        "disagfusion_handoff_bytes_total",
        "disagfusion_handoff_seconds_count",
    ]
    for child in cluster.children:
        text = scrape(child.http_url)
        check = subprocess.run(
            ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
        )
        assert check.returncode == 0, (child.name, check.stdout, check.stderr)
        names = {(n, lab.get("pipeline")) for n, lab, _ in samples(text)}
        wanted = (
            [
                "disagfusion_gateway_request_duration_seconds_count",
                "disagfusion_gateway_requests_total",
            ]
            if child.role == "gateway"
            else required_stage
        )
        for name in wanted:
            assert (name, "local") in names, (child.name, name)
    gw = scrape(cluster.gateway.http_url)  # type: ignore[union-attr]
    assert metric_value(gw, "disagfusion_gateway_requests_total", code="200") >= 1
    assert metric_value(gw, "disagfusion_gateway_requests_total", code="400") >= 0


@pytest.fixture
def small_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path, encoders=1, denoisers=2, decoders=1)
    yield c
    c.stop()


def test_killing_a_denoiser_under_load_loses_no_request(small_cluster: LocalCluster) -> None:
    bodies = [
        {"prompt": f"request {i}", "seed": i, "size": "128x128", "num_inference_steps": 20}
        for i in range(12)
    ]
    victim = small_cluster.workers["denoiser"][0]
    results: list[tuple[int, object]] = []
    worker = threading.Thread(
        target=lambda: results.extend(generate_many(small_cluster, bodies, concurrency=6))
    )
    worker.start()
    # Kill it while it holds work, so the custody path is what saves the requests.
    deadline = time.monotonic() + 120
    while metric_value(scrape(victim.http_url), "disagfusion_stage_in_flight") < 1:
        assert time.monotonic() < deadline, "victim never received work"
        time.sleep(0.05)
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)
    worker.join(timeout=300)
    assert not worker.is_alive()
    statuses = [status for status, _ in results]
    assert statuses == [200] * len(bodies), results
    encoder = small_cluster.workers["encoder"][0]
    retries = metric_value(scrape(encoder.http_url), "disagfusion_handoff_retries_total")
    assert retries >= 1, "the encoder never re-sent the payloads the dead denoiser held"


def test_full_pipeline_answers_429_with_retry_after(tmp_path: Path) -> None:
    c = start_cluster(
        tmp_path, encoders=1, denoisers=1, decoders=1, max_waiting=1, queue_capacity=1
    )
    try:
        body = {"prompt": "slow", "size": "128x128", "num_inference_steps": 30}
        seen: list[tuple[int, str | None]] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            req = urllib.request.Request(
                c.url + "/v1/images/generations",
                method="POST",
                data=json.dumps({**body, "seed": i}).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=300) as resp:
                    status, retry = resp.status, None
            except urllib.error.HTTPError as err:
                status, retry = err.code, err.headers.get("Retry-After")
                assert "error" in json.loads(err.read())
            with lock:
                seen.append((status, retry))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        statuses = sorted(s for s, _ in seen)
        assert len(seen) == 16
        assert set(statuses) <= {200, 429}, statuses
        assert 429 in statuses and 200 in statuses
        assert all(r is not None and int(r) >= 1 for s, r in seen if s == 429)
    finally:
        c.stop()


def test_serve_local_stops_every_child_on_sigterm(tmp_path: Path) -> None:
    with ServeLocal(tmp_path) as server:
        server.wait_serving()
        children = children_of(server.proc.pid)
        assert len(children) == 4  # gateway + three stages
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        assert time.monotonic() - started < 20, "an idle pipeline stops in seconds"
        for pid in children:
            wait_gone(pid)
        with socket.socket() as s:
            # Nothing listens on the gateway's port any more (SO_REUSEADDR, as
            # servers bind, looks past connections left in TIME_WAIT).
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", server.port))
            s.listen()
    # Stopped in pipeline order, nobody saw a peer vanish: no warnings in any log.
    for log in tmp_path.glob("*.log"):
        warnings = [line for line in log.read_text().splitlines() if " WARNING " in line]
        assert not warnings, (log.name, warnings)


def test_children_die_with_a_killed_launcher(tmp_path: Path) -> None:
    with ServeLocal(tmp_path) as server:
        wait_until("four children", lambda: len(children_of(server.proc.pid)) == 4, 60)
        children = children_of(server.proc.pid)
        server.proc.kill()
        server.proc.wait()
        for pid in children:
            wait_gone(pid)


def test_grpc_generate_gives_the_same_image_as_http(cluster: LocalCluster) -> None:
    import grpc

    from disagfusion.proto import disagfusion_pb2 as pb
    from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc

    assert cluster.gateway is not None
    with grpc.insecure_channel(cluster.gateway.address) as channel:
        stub = pb_grpc.GatewayStub(channel)
        reply = stub.Generate(
            pb.GenerateRequest(prompt="a red fox", seed=21, size="64x64"), timeout=300
        )
        with pytest.raises(grpc.RpcError) as bad:
            stub.Generate(pb.GenerateRequest(prompt="x", size="63x64"), timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "size" in (bad.value.details() or "")
    status, http = generate(cluster, {"prompt": "a red fox", "seed": 21, "size": "64x64"})
    assert status == 200
    assert len(reply.images) == 1 and reply.request_id
    from_grpc = np.asarray(Image.open(io.BytesIO(reply.images[0].png)))
    assert np.array_equal(from_grpc, decode_pngs(http)[0])


def test_serve_local_refuses_a_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "disagfusion", "serve", "--local", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 2
    assert f"port {port} is in use" in out.stderr
