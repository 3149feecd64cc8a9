"""Faults and shutdown through the main job: `disagfusion serve --local` as a subprocess.

kill -9 of a worker under load: the launcher restarts it on the same ports
and the upstream's custody re-sends what it held, so every accepted request
gets its image. SIGTERM under load: the gateway drains first, then each
stage, so every accepted request gets an image or a JSON error.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.worker.cluster_utils import metric_value, scrape
from tests.worker.serve_local import ServeLocal, children_of, is_ready, wait_gone, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
# Long enough per request that the victim holds work when it is killed.
BODY = {"size": "128x128", "num_inference_steps": 20}


def _post(url: str, body: dict[str, Any]) -> tuple[int | str, Any, dict[str, str]]:
    """(status, JSON body, headers); status 'dropped' when no HTTP answer came."""
    request = urllib.request.Request(
        url + "/v1/images/generations",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)
    except (urllib.error.URLError, OSError) as err:
        return "dropped", str(err), {}


class Load:
    """`count` requests at `concurrency`, in the background."""

    def __init__(self, url: str, count: int, concurrency: int) -> None:
        self.results: list[tuple[int | str, Any, dict[str, str]]] = []
        bodies = [{"prompt": f"request {i}", "seed": i, **BODY} for i in range(count)]
        self._pool = ThreadPoolExecutor(concurrency)
        self._thread = threading.Thread(
            target=lambda: self.results.extend(self._pool.map(lambda b: _post(url, b), bodies))
        )
        self._thread.start()

    def join(self, timeout_s: float = 360.0) -> list[int | str]:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "requests still running"
        self._pool.shutdown()
        return [status for status, _, _ in self.results]


@pytest.mark.parametrize(
    ("role", "args"),
    [("denoiser", ["--denoisers", "2"]), ("encoder", []), ("decoder", [])],
)
def test_kill_9_of_a_worker_under_load_loses_no_accepted_request(
    tmp_path: Path, role: str, args: list[str]
) -> None:
    with ServeLocal(tmp_path, *args) as server:
        server.wait_serving()
        victim = server.worker(role)
        load = Load(server.url, count=12, concurrency=6)
        wait_until(
            f"{role} holding work",
            lambda: metric_value(scrape(victim.http_url), "disagfusion_stage_in_flight") >= 1,
        )
        signal_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        statuses = load.join()
        assert statuses == [200] * 12, [r[:2] for r in load.results if r[0] != 200]
        line = server.wait_for_line("exited unexpectedly (signal SIGKILL)")
        assert line.split(" ", 2)[1].startswith(f"{role}-"), line
        assert "restarting in 1s" in line
        # It comes back on the same ports, and the pipeline is ready again.
        back = wait_until(
            f"{role} restarted",
            lambda: next(
                (
                    p
                    for p in server.children()
                    if p.role == role
                    and p.pid != victim.pid
                    and p.flag("--port") == victim.flag("--port")
                ),
                None,
            ),
        )
        wait_until(f"{role} ready again", lambda: is_ready(back.http_url))
        wait_until("gateway ready again", lambda: is_ready(server.url))
        assert time.monotonic() - signal_at < 300
        assert server.proc.poll() is None, server.output()
        # And it serves a new request.
        status, reply, _ = _post(server.url, {"prompt": "after the crash", **BODY})
        assert status == 200 and len(reply["data"]) == 1


def test_a_worker_that_crashes_at_every_start_is_given_up_on(tmp_path: Path) -> None:
    cache = tmp_path / "models"
    with ServeLocal(tmp_path, "--denoisers", "2", env={"DISAGFUSION_CACHE": str(cache)}) as server:
        server.wait_serving()
        # The denoiser's weights go bad on disk: every restart fails to load them.
        weights = list(cache.rglob("unet/*.safetensors"))
        assert weights, sorted(cache.rglob("*"))
        for path in weights:
            # A new file, not an edit in place: the live denoiser maps the old one.
            broken = path.with_suffix(".broken")
            broken.write_bytes(b"not safetensors")
            broken.replace(path)
        victim = server.worker("denoiser", 1)
        os.kill(victim.pid, signal.SIGKILL)
        line = server.wait_for_line("giving up on it", timeout_s=300)
        name = line.split(" ", 2)[1]  # after the time stamp
        assert name.startswith("denoiser-"), line
        assert f"{name} exited (code 1) after 5 restarts within 300s" in line
        assert sum(f"{name} exited unexpectedly" in x for x in server.lines) == 5
        # One denoiser is left, so the pipeline keeps serving.
        time.sleep(1.0)
        assert server.proc.poll() is None, server.output()
        status, _, _ = _post(server.url, {"prompt": "still here", **BODY})
        assert status == 200
        server.signal(signal.SIGTERM)
        assert server.proc.wait(60) == 0


@pytest.mark.parametrize("drain_timeout", [60, 1])
def test_sigterm_under_load_answers_every_accepted_request(
    tmp_path: Path, drain_timeout: int
) -> None:
    with ServeLocal(tmp_path, "--drain-timeout", str(drain_timeout)) as server:
        server.wait_serving()
        children = children_of(server.proc.pid)
        assert len(children) == 4
        load = Load(server.url, count=6, concurrency=6)
        wait_until(
            "requests accepted",
            lambda: metric_value(scrape(server.url), "disagfusion_gateway_pending_requests") >= 6,
        )
        stopped_at = time.monotonic()
        server.signal(signal.SIGTERM)
        # A new request while draining is refused with 503 + Retry-After, as JSON.
        wait_until("the gateway draining", lambda: not is_ready(server.url), 30)
        late = _post(server.url, {"prompt": "too late", **BODY})
        statuses = load.join()
        assert server.proc.wait(120) == 0, server.output()
        for pid in children:
            wait_gone(pid)
    assert "dropped" not in statuses, load.results
    if drain_timeout == 60:
        assert statuses == [200] * 6, [r[:2] for r in load.results]
    else:
        failed = [(s, body) for s, body, _ in load.results if s != 200]
        assert failed, "a 1 s drain cannot finish six requests"
        for status, body in failed:
            assert (
                status == 503
                and "shut down before this request finished" in (body["error"]["message"])
            )
        assert time.monotonic() - stopped_at < 60
    if late[0] != "dropped":  # the gateway may be gone already when it was that quick
        assert late[0] == 503 and late[2].get("Retry-After"), late
        assert "shutting down" in late[1]["error"]["message"]
