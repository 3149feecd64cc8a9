"""Cancellation through `serve --local`: a client that goes away frees the pipeline.

Three long requests (200 denoising steps each on one denoiser: one computing,
two queued) whose clients hang up: the gateway cancels them down the pipeline,
the denoiser drops the queued ones and stops the running one at its next step,
and the next request is served at once instead of after all three.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.worker.serve_local import ServeLocal, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
LONG = {"prompt": "a very slow fox", "size": "128x128", "num_inference_steps": 200}
QUICK = {"prompt": "a quick fox", "size": "64x64", "num_inference_steps": 2}


def metric(url: str, name: str) -> float:
    """The sum of a metric's samples on a process's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def post(url: str, body: dict[str, object], timeout_s: float) -> float:
    """POST and return the seconds to the answer (raises on a timeout: the hang-up)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=timeout_s)
    try:
        conn.request(
            "POST",
            "/v1/images/generations",
            json.dumps(body),
            {"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
    finally:
        conn.close()  # a client timeout closes the socket: the gateway sees it go
    return time.monotonic() - started


def test_clients_that_hang_up_free_the_stages_at_once(tmp_path: Path) -> None:
    with ServeLocal(tmp_path, "--max-batch", "1") as serve:
        serve.wait_serving()
        alone = post(serve.url, LONG, 300)  # how long one long request takes here
        denoiser = serve.worker("denoiser").http_url
        gateway = serve.url
        with ThreadPoolExecutor(max_workers=3) as pool:
            hang_ups = [pool.submit(post, serve.url, LONG, 3.0) for _ in range(3)]
            wait_until(
                "the denoiser holds the three requests",
                lambda: (
                    metric(denoiser, "disagfusion_stage_in_flight") >= 3
                    or metric(denoiser, "disagfusion_stage_queue_depth") >= 1
                ),
                60,
            )
            for f in hang_ups:
                with pytest.raises(TimeoutError):
                    f.result()
        gone = time.monotonic()
        wait_until(
            "the denoiser holds nothing",
            lambda: (
                metric(denoiser, "disagfusion_stage_in_flight") == 0
                and metric(denoiser, "disagfusion_stage_queue_depth") == 0
            ),
            30,
        )
        freed = time.monotonic() - gone
        assert freed < max(5.0, alone / 4), (freed, alone)  # not after the running one
        assert metric(gateway, "disagfusion_gateway_cancels_total") == 3
        assert metric(gateway, "disagfusion_gateway_cancels_held_total") >= 3
        dropped = "disagfusion_stage_requests_failed_total"
        assert metric(denoiser, dropped) >= 3
        assert metric(gateway, "disagfusion_gateway_pending_requests") == 0
        # The next request is served at once, not behind three abandoned ones.
        assert post(serve.url, QUICK, 120) < alone
