"""Speed-aware dispatch through the main job: `serve --local` with one denoiser
emulating a slower accelerator (`--slowdown denoiser:1=2.7`).

Requests go where they are expected to finish first, so the fast instance
takes the larger share, in proportion to speed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.worker.cluster_utils import metric_value, scrape
from tests.worker.serve_local import Process, ServeLocal
from tests.worker.test_serve_local import Load

SLOW = 2.7


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_fast_denoiser_takes_the_larger_share_in_proportion_to_speed(tmp_path: Path) -> None:
    args = ["--denoisers", "2", "--slowdown", f"denoiser:1={SLOW}", "--max-batch", "1"]
    with ServeLocal(tmp_path, *args) as server:
        server.wait_serving()
        denoisers = [server.worker("denoiser", i) for i in (0, 1)]
        (slow,) = [p for p in denoisers if "--slowdown" in p.argv]
        (fast,) = [p for p in denoisers if p is not slow]
        assert slow.flag("--slowdown") == str(SLOW)
        load = Load(server.url, count=80, concurrency=10)
        assert load.join() == [200] * 80

        def done(worker: Process) -> float:
            return metric_value(
                scrape(worker.http_url), "disagfusion_stage_requests_completed_total"
            )

        def seconds_per_request(worker: Process) -> float:
            text = scrape(worker.http_url)
            total = metric_value(text, "disagfusion_stage_service_time_seconds_sum")
            return total / metric_value(text, "disagfusion_stage_service_time_seconds_count")

        # Speed as served: on two shared cores the slow one's emulated wait frees
        # CPU for the fast one, so the real ratio is not exactly the flag's.
        speed = seconds_per_request(slow) / seconds_per_request(fast)
        assert speed > 2.0, speed
        share = done(fast) / max(done(slow), 1.0)
        assert abs(share - speed) / speed < 0.2, (done(fast), done(slow), speed)


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("denoiser:2=2.0", "there are 1 denoiser(s)"),
        ("denoiser:0=0.5", "a number >= 1"),
        ("gateway:0=2", "STAGE:INDEX=FACTOR"),
        ("denoiser=2", "STAGE:INDEX=FACTOR"),
    ],
)
def test_a_bad_slowdown_is_refused_by_name(flag: str, message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "disagfusion", "serve", "--local", "--slowdown", flag],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
