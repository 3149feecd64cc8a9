"""Autoscaling end to end: real workers → real Prometheus → the operator's timer → KMock.

A real local pipeline (`LocalCluster`: gateway + encoder + denoiser + decoder
processes, builtin:tiny-unet, labelled `--pipeline sd`) exports the worker
and gateway metrics; a real Prometheus (/usr/bin/prometheus, loopback, temp
storage, 1 s scrapes, `namespace="ml"` added as a target label the way a
PodMonitor does) scrapes them; the operator runs against KMock with the
production HybridPolicy and an inline profile. A client pool then loads the
pipeline: the denoiser queue builds and the arrival rate rises, so the
operator scales the denoiser StatefulSet up and records it in status; when
the load stops it scales back down after the (short) scale-down window.

KMock has no StatefulSet controller, so a small loop here plays it (ready
replicas follow spec.replicas); the local processes do not follow the
StatefulSet's size, so the load stays high until the client pool stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from disagfusion.worker.gateway.client import post_json
from disagfusion.worker.local.launcher import LocalCluster, free_port
from tests.operator.emulator import NS, STS, Cluster, eventually, pipeline
from tests.operator.test_autoscale_operator import (
    auto_status,
    cond_status,
    events,
    operator,
    replicas,
)
from tests.worker.cluster_utils import start_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SCALE_WAIT_S = 150.0  # model start-up and a loaded 2-core machine; polls end as soon as met

# A CPU profile in the scale of tiny-unet at 64x64: only the order of magnitude matters,
# the policy rescales it by the observed/predicted service-time ratio.
TINY_PROFILE = {
    "name": "tiny-unet-cpu",
    "accelerators": [{"name": "cpu", "cost_per_hour": 0.0, "memory_gb": 64}],
    "startup_seconds": 2,
    "handoff_seconds": 0.01,
    "default_request": {"width": 64, "height": 64, "frames": 1, "steps": 20},
    "defaults": {"gpus": 12, "slo": "2x"},
    "stages": {
        "encoder": {"cpu": {"a": 0.02, "memory_gb": 1}},
        "denoiser": {"cpu": {"c": 3.5, "memory_gb": 1}},
        "decoder": {"cpu": {"b": 5.0, "memory_gb": 1}},
    },
}


@contextlib.contextmanager
def prometheus(tmp: Path, targets: list[str]) -> Iterator[str]:
    """A real Prometheus scraping `targets` every second; yields its base URL."""
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "disagfusion",
                "static_configs": [{"targets": targets, "labels": {"namespace": NS}}],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"prometheus did not start: {(tmp / 'prometheus.log').read_text()}"
                )
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Load:
    """A pool of clients sending image requests back to back until stopped."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url + "/v1/images/generations"
        self.stop = threading.Event()
        self.answers: dict[int, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, seed: int) -> None:
        body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 20, "seed": seed}
        while not self.stop.is_set():
            status, _ = post_json(self.url, body, timeout_s=120)
            self.answers[status] = self.answers.get(status, 0) + 1
            if status != 200:
                self.stop.wait(0.05)  # 429: the gateway is full; try again soon

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)


@contextlib.asynccontextmanager
async def statefulset_controller(cluster: Cluster, name: str) -> AsyncIterator[None]:
    """KMock has no controllers: make each stage's ready replicas follow spec.replicas."""

    async def loop() -> None:
        while True:
            for stage in ("encoder", "denoiser", "decoder"):
                sts = cluster.get(STS, f"{name}-{stage}")
                if sts is None:
                    continue
                want = int(sts["spec"]["replicas"])
                if (sts.get("status") or {}).get("readyReplicas") != want:
                    await cluster.patch(
                        f"/apis/apps/v1/namespaces/{NS}/statefulsets/{name}-{stage}/status",
                        {"status": {"replicas": want, "readyReplicas": want}},
                    )
            await asyncio.sleep(0.3)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("workers"), pipeline="sd", max_waiting=8)
    yield c
    c.stop()


async def test_load_scales_the_denoiser_up_then_down(
    cluster: Cluster, workers: LocalCluster, tmp_path: Path
) -> None:
    targets = [c.http_url.removeprefix("http://") for c in workers.children]
    spec_ = pipeline(
        "sd",
        stages={"denoiser": {"replicas": 1, "minReplicas": 1, "maxReplicas": 4}},
        autoscaling={
            "mode": "Active",
            "customProfile": TINY_PROFILE,
            "intervalSeconds": 1,
            "scaleDownWindowSeconds": 3,
            "staleAfterSeconds": 30,
        },
    )
    with prometheus(tmp_path, targets) as prom_url:
        async with (
            operator(cluster, prometheus_url=prom_url, policy=None) as ctx,
            statefulset_controller(cluster, "sd"),
        ):
            await cluster.create(spec_)
            # Idle: fresh metrics, zero demand, the spec's sizes.
            await eventually(
                lambda: cond_status(cluster, "sd", "MetricsAvailable") == "True", SCALE_WAIT_S
            )
            assert auto_status(cluster, "sd")["policy"] == "hybrid"
            ok_rounds = ctx.metrics.scaling.rounds.labels(result="ok")
            idle_from = ok_rounds._value.get()
            await eventually(lambda: ok_rounds._value.get() >= idle_from + 3, SCALE_WAIT_S)
            assert replicas(cluster, "sd-denoiser") == 1
            assert auto_status(cluster, "sd")["stages"]["denoiser"]["desiredReplicas"] == 1

            observed = ctx.metrics.scaling.observed_service_time.labels(NS, "sd", "denoiser")
            with Load(workers.url, clients=6) as load:
                await eventually(lambda: (replicas(cluster, "sd-denoiser") or 0) >= 2, SCALE_WAIT_S)
                # Read under load: once it stops, a round over an empty window may say 0.
                await eventually(lambda: observed._value.get() > 0, SCALE_WAIT_S)
            assert load.answers.get(200, 0) > 0, load.answers
            status = auto_status(cluster, "sd")
            up = [h for h in status["history"] if h["stage"] == "denoiser" and h["to"] > h["from"]]
            assert up and up[0]["applied"] is True and up[0]["from"] == 1, status["history"]
            assert status["lastScaleTime"]
            await eventually(
                lambda: any("denoiser 1 -> " in e["message"] for e in events(cluster, "Scaled"))
            )
            peak = replicas(cluster, "sd-denoiser")

            # No load: the arrival rate falls to zero and the denoiser shrinks back.
            await eventually(lambda: replicas(cluster, "sd-denoiser") == 1, SCALE_WAIT_S)
            down = [
                h
                for h in auto_status(cluster, "sd")["history"]
                if h["stage"] == "denoiser" and h["to"] < h["from"]
            ]
            assert down and down[-1]["to"] == 1 and peak is not None and peak >= 2
            assert cond_status(cluster, "sd", "MetricsAvailable") == "True"
