"""The KMock harness for operator tests: an in-process Kubernetes API emulator
(`StampingEmulator`), a `Cluster` to read, write and run operators against it,
and polling helpers. tests/operator/conftest.py provides it as `cluster`.

KMock 0.8 sets no resourceVersion/uid/generation and replays ADDED on every
watch; `StampingEmulator` stamps them (and names objects with generateName)
so kopf sees a realistic API. kopf runs in this event loop; the handlers run
the sync `kubernetes` client in threads against the same loop's server.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import kmock
import kopf
from kmock._internal import enums, rendering

from disagfusion.operator.context import Context
from disagfusion.operator.handlers import build_registry
from disagfusion.operator.kube import Kube
from disagfusion.operator.metrics import OperatorMetrics
from tests.operator.kubeconfig import kubeconfig_env

NS = "ml"
CRD = kmock.resource("disagfusion.io", "v1alpha1", "diffusionpipelines")
STS = kmock.resource("apps", "v1", "statefulsets")
DEPLOY = kmock.resource("apps", "v1", "deployments")
SVC = kmock.resource("", "v1", "services")
CM = kmock.resource("", "v1", "configmaps")
EVENTS = kmock.resource("", "v1", "events")
STAGES = ("encoder", "denoiser", "decoder")
WAIT_S = 20.0  # generous for loaded machines; polls return as soon as met


class StampingEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator plus uid, resourceVersion, generation and generateName."""

    _counter = itertools.count(1)

    async def _handle(self, request: rendering.Request) -> Any:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(self._counter))
            if request.action == enums.action.CREATE:
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:6]}"
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("generation", 1)
                meta.setdefault(
                    "creationTimestamp",
                    datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                )
            elif (
                request.action == enums.action.UPDATE
                and request.subresource is None
                and request.name is not None
            ):
                key = (request.resource, request.namespace, request.name)
                if "spec" in data and key in self.objects and not self.objects[key].deleted:
                    old = self.objects[key].raw
                    if old.get("spec") != _merged(old.get("spec"), data["spec"]):
                        meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        return await super()._handle(request)


def _merged(old: Any, patch: Any) -> Any:
    if not isinstance(old, dict) or not isinstance(patch, dict):
        return patch
    out = dict(old)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(old.get(key), value)
    return out


def pipeline(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "disagfusion.io/v1alpha1",
        "kind": "DiffusionPipeline",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"model": {"source": "builtin:tiny-unet"}, **spec},
    }


class Cluster:
    """The emulator, a Kube client for the test's own writes, and running operators."""

    def __init__(self, emulator: StampingEmulator, url: str) -> None:
        self.emulator = emulator
        self.url = url
        self.metrics = OperatorMetrics()

    def get(self, res: Any, name: str) -> dict[str, Any] | None:
        key = (res, NS, name)
        if key not in self.emulator.objects or self.emulator.objects[key].deleted:
            return None
        return copy.deepcopy(self.emulator.objects[key].raw)

    def writes(self, res: Any) -> int:
        return sum(
            1
            for r in self.emulator._requests
            if r.resource == res and r.method in ("POST", "PATCH", "PUT")
        )

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        # A fresh client per call, closed after: a pooled connection kept across
        # an operator's shutdown was seen to hang against the emulator.
        kube = Kube.for_host(self.url, timeout_s=5)
        try:
            return await asyncio.to_thread(
                kube.request, method, path, body, "application/merge-patch+json"
            )
        finally:
            kube.close()

    async def create(self, body: dict[str, Any]) -> None:
        await self.request(
            "POST", f"/apis/disagfusion.io/v1alpha1/namespaces/{NS}/diffusionpipelines", body
        )

    async def patch(self, path: str, body: dict[str, Any]) -> None:
        await self.request("PATCH", path, body)

    async def delete(self, path: str) -> None:
        await self.request("DELETE", path)

    @contextlib.asynccontextmanager
    async def operator(self, timer_interval: float = 0.5) -> AsyncIterator[None]:
        registry = build_registry(timer_interval=timer_interval)

        settings = kopf.OperatorSettings()
        settings.watching.server_timeout = 60
        settings.queueing.idle_timeout = 0.5  # quick shutdown (default 5 s)
        settings.queueing.exit_timeout = 0.5
        stop = asyncio.Event()
        ready = asyncio.Event()
        kube = Kube.for_host(self.url, timeout_s=5)
        memo = kopf.Memo(context=Context(kube=kube, metrics=self.metrics))
        env = contextlib.ExitStack()
        env.enter_context(kubeconfig_env(self.url))  # kopf logs in as in production
        task = asyncio.create_task(
            kopf.operator(
                registry=registry,
                settings=settings,
                clusterwide=True,  # kmock 0.8 cannot parse GET /api/v1/namespaces
                standalone=True,
                memo=memo,
                stop_flag=stop,
                ready_flag=ready,
            )
        )
        await asyncio.wait_for(ready.wait(), WAIT_S)
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(task, WAIT_S)
            kube.close()
            env.close()


async def eventually(check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Poll `check` until it returns a truthy value (bounded wait, never a fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(0.05)


def container(sts: dict[str, Any]) -> dict[str, Any]:
    return sts["spec"]["template"]["spec"]["containers"][0]


def condition(body: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((body or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    return None
