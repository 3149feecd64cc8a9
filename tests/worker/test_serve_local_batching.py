"""Batching and queue order through the main job: `disagfusion serve --local`.

Concurrent requests share denoiser calls and each still gets its own images
(equal, within 1/255, to the same request served alone); a denoiser killed
while it computes a batch loses none of it; the queue order and SLO flags
reach the processes they are meant for.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from tests.worker.cluster_utils import metric_value, scrape
from tests.worker.serve_local import ServeLocal, wait_until
from tests.worker.test_serve_local import Load

PROMPT = "a lighthouse at dusk"


def _client(server: ServeLocal) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _images(result: Any) -> np.ndarray:
    return np.stack(
        [np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json)))) for d in result.data]
    )


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_concurrent_requests_share_calls_and_keep_their_own_images(tmp_path: Path) -> None:
    with ServeLocal(tmp_path, "--max-batch", "4") as server:
        server.wait_serving()
        client = _client(server)
        bodies = [{"seed": 10 + i, "num_inference_steps": 12, "n": 1 + (i == 2)} for i in range(8)]

        def generate(body: dict[str, Any]) -> np.ndarray:
            n = body["n"]
            extra = {k: v for k, v in body.items() if k != "n"}
            return _images(client.images.generate(prompt=PROMPT, n=n, extra_body=extra))

        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(generate, bodies))
        denoiser = scrape(server.worker("denoiser").http_url)
        calls = metric_value(denoiser, "disagfusion_stage_batch_size_count")
        requests = metric_value(denoiser, "disagfusion_stage_batch_size_sum")
        assert requests == 8 and calls < requests, "no call took more than one request"
        assert metric_value(denoiser, "disagfusion_stage_max_batch") == 4
        for body, got in zip(bodies, together, strict=True):
            alone = generate(body)  # one at a time: a batch of one
            assert got.shape == alone.shape == (body["n"], 64, 64, 3)
            assert np.abs(got.astype(int) - alone.astype(int)).max() <= 1, body
        assert not np.array_equal(together[0], together[1]), "seeds must stay per request"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill_9_of_a_denoiser_computing_a_batch_loses_no_request(tmp_path: Path) -> None:
    with ServeLocal(tmp_path, "--denoisers", "2", "--max-batch", "4") as server:
        server.wait_serving()
        victim = server.worker("denoiser")
        load = Load(server.url, count=16, concurrency=8)

        def computing_a_batch() -> bool:
            text = scrape(victim.http_url)
            busy = metric_value(text, "disagfusion_stage_busy") == 1
            return busy and metric_value(text, "disagfusion_stage_in_flight") >= 2

        wait_until("the denoiser computing a batch", computing_a_batch, timeout_s=240)
        os.kill(victim.pid, signal.SIGKILL)
        statuses = load.join()
        assert statuses == [200] * 16, [r[:2] for r in load.results if r[0] != 200]
        server.wait_for_line("exited unexpectedly (signal SIGKILL)")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_queue_order_and_slo_reach_the_workers_and_the_gateway(tmp_path: Path) -> None:
    args = ["--queue-order", "edf", "--slo", "3x", "--max-batch", "2", "--batch-wait-ms", "5"]
    with ServeLocal(tmp_path, *args) as server:
        server.wait_serving()
        for role in ("encoder", "denoiser", "decoder"):
            worker = server.worker(role)
            assert worker.flag("--queue-order") == "edf"
            assert worker.flag("--max-batch") == "2"
            assert worker.flag("--batch-wait-ms") == "5.0"
            info = metric_value(
                scrape(worker.http_url), "disagfusion_worker_info", queue_order="edf"
            )
            assert info == 1, role
        gateway = server.worker("gateway")
        assert gateway.flag("--slo") == "3x"
        client = _client(server)
        for seed in range(3):
            client.images.generate(prompt=PROMPT, extra_body={"seed": seed})
        outcomes = scrape(server.url)
        met = metric_value(outcomes, "disagfusion_gateway_slo_total", outcome="met")
        missed = metric_value(outcomes, "disagfusion_gateway_slo_total", outcome="missed")
        assert met + missed == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["worker", "--role", "decoder", "--port", "1", "--http-port", "2", "--max-batch", "0"],
            "--max-batch",
        ),
        (
            [
                "worker",
                "--role",
                "decoder",
                "--port",
                "1",
                "--http-port",
                "2",
                "--queue-order",
                "lifo",
            ],
            "lifo",
        ),
        (["serve", "--local", "--slo", "fast"], "--slo"),
        (["gateway", "--topology", "{}", "--slo", "0x"], "--slo"),
    ],
)
def test_bad_batching_flags_are_refused_by_name(argv: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "disagfusion", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_cli_knows_the_policy_s_queue_orders() -> None:
    from disagfusion.cli.common import QUEUE_ORDERS as CLI_ORDERS
    from disagfusion.scheduling.queue_order import QUEUE_ORDERS

    assert CLI_ORDERS == QUEUE_ORDERS
