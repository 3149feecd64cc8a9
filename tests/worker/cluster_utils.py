"""Helpers for tests that run real local clusters (separate OS processes)."""

from __future__ import annotations

import base64
import io
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from disagfusion.worker.gateway.client import post_json
from disagfusion.worker.local.launcher import LocalCluster, LocalOptions, free_port


def start_cluster(tmp: Path, **overrides: Any) -> LocalCluster:
    opts = LocalOptions(port=free_port(), log_dir=tmp, threads=1, **overrides)
    cluster = LocalCluster(opts)
    cluster.start()
    try:
        cluster.wait_ready(timeout_s=240)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def generate(cluster: LocalCluster, body: dict[str, Any]) -> tuple[int, Any]:
    return post_json(cluster.url + "/v1/images/generations", body, timeout_s=300)


def generate_many(
    cluster: LocalCluster, bodies: list[dict[str, Any]], concurrency: int = 4
) -> list[tuple[int, Any]]:
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(lambda b: generate(cluster, b), bodies))


def decode_pngs(reply: dict[str, Any]) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))
        for item in reply["data"]
    ]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            yield s.name, s.labels, s.value


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        value
        for n, lab, value in samples(text)
        if n == name and all(lab.get(k) == v for k, v in labels.items())
    )
