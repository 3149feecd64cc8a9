"""kubectl, port-forward, HTTP and polling helpers for the end-to-end tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parent.parent
ENABLED = os.environ.get("DISAGFUSION_E2E") == "1"
SKIP_REASON = "end-to-end tests need a cluster; run e2e/run.sh or set DISAGFUSION_E2E=1"
T = TypeVar("T")


@dataclass(frozen=True)
class E2EConfig:
    kubectl: str
    namespace: str
    worker_image: str | None  # set: spec.image of the example; None: the example as is
    default_worker_image: str | None  # the chart's workerImage, when known
    ready_timeout_s: int
    keep: bool


def config() -> E2EConfig:
    return E2EConfig(
        kubectl=os.environ.get("KUBECTL", "kubectl"),
        namespace=os.environ.get("E2E_NAMESPACE", "disagfusion-e2e"),
        worker_image=os.environ.get("E2E_WORKER_IMAGE") or None,
        default_worker_image=os.environ.get("E2E_DEFAULT_WORKER_IMAGE") or None,
        ready_timeout_s=int(os.environ.get("E2E_READY_TIMEOUT", "900")),
        keep=os.environ.get("E2E_KEEP") == "1",
    )


class Kubectl:
    def __init__(self, cfg: E2EConfig) -> None:
        self.cfg = cfg

    def __call__(
        self, *args: str, stdin: str | None = None, timeout: float = 120, check: bool = True
    ) -> str:
        cmd = [self.cfg.kubectl, "--namespace", self.cfg.namespace, *args]
        result = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self("get", *args, "-o", "json"))

    def describe(self, *args: str) -> str:
        """Diagnostics for a failure message (never raises)."""
        return self("describe", *args, check=False, timeout=60)

    @contextmanager
    def port_forward(self, target: str, port: int) -> Iterator[int]:
        """Forward a random local port to `target`:`port`; yields the local port."""
        cmd = [self.cfg.kubectl, "--namespace", self.cfg.namespace, "port-forward"]
        proc = subprocess.Popen(
            [*cmd, target, f":{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:43121 -> 8000"
            m = re.search(r"127\.0\.0\.1:(\d+)", line)
            assert m, f"kubectl port-forward {target} said: {line!r}"
            yield int(m.group(1))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def eventually(check: Callable[[], T | None], timeout: float, what: str, every: float = 2) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
            if last:
                return last
        except (AssertionError, OSError, ValueError, KeyError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last}")
        time.sleep(every)


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def example_pipeline(cfg: E2EConfig) -> dict[str, Any]:
    """examples/tiny-local.yaml: as is (the operator's worker image), or with spec.image set."""
    docs = [
        d
        for d in yaml.safe_load_all((REPO / "examples" / "tiny-local.yaml").read_text())
        if d and d.get("kind") == "DiffusionPipeline"
    ]
    (pipeline,) = docs
    pipeline["metadata"]["namespace"] = cfg.namespace
    if cfg.worker_image is not None:
        pipeline["spec"]["image"] = cfg.worker_image
    return pipeline
