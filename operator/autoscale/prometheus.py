"""Prometheus HTTP API client: PromQL instant queries (I/O only, no interpretation).

`GET /api/v1/query?query=...` answers `{"status": "success", "data":
{"resultType": "vector", "result": [{"metric": {...}, "value": [t, "v"]}]}}`.
Any failure (connection, timeout, HTTP error, bad JSON, status "error")
raises `PrometheusError`, so the caller can hold sizes instead of guessing.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class PrometheusError(RuntimeError):
    """A query that gave no usable answer."""


class Prometheus:
    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def query(self, promql: str, at: float | None = None) -> dict[str, Any]:
        """One instant query; the `data` object of the answer."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            # Prometheus puts the reason in a JSON body for 400/422/503.
            detail = err.read()[:300].decode(errors="replace")
            raise PrometheusError(f"{promql!r}: HTTP {err.code}: {detail}") from err
        except (OSError, ValueError) as err:  # refused, DNS, timeout, bad URL
            raise PrometheusError(f"{self.url}: {err}") from err
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise PrometheusError(f"{promql!r}: answer is not JSON") from err
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            raise PrometheusError(f"{promql!r}: {error}")
        data = body.get("data")
        if not isinstance(data, dict):
            raise PrometheusError(f"{promql!r}: answer has no data")
        return data

    def query_all(
        self, queries: Mapping[str, str], at: float | None = None
    ) -> dict[str, dict[str, Any]]:
        """Several instant queries at one evaluation time, in parallel; any failure raises."""
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(queries)))) as pool:
            futures = {key: pool.submit(self.query, q, at) for key, q in queries.items()}
            return {key: future.result() for key, future in futures.items()}
