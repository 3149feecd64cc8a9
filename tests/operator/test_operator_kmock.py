"""The operator end to end against KMock, an in-process Kubernetes API emulator.

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
import warnings
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import kmock
import kopf
import pytest
from kmock._internal import enums, rendering

from disagfusion.operator.context import Context
from disagfusion.operator.handlers import build_registry
from disagfusion.operator.kube import Kube
from disagfusion.operator.metrics import OperatorMetrics
from disagfusion.operator.render import HASH_ANNOTATION
from tests.operator.kubeconfig import kubeconfig_env

# A hang fails fast instead of stalling the suite.
pytestmark = pytest.mark.timeout(60)
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


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    emulator = StampingEmulator()
    with warnings.catch_warnings():  # kmock 0.8 uses importlib.resources.read_binary
        warnings.simplefilter("ignore", DeprecationWarning)
        emulator.resources.load_bundled()
    emulator.resources[CRD] = kmock.ResourceInfo(
        kind="DiffusionPipeline",
        singular="diffusionpipeline",
        namespaced=True,
        shortnames={"dfp"},
        verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
        subresources={"status"},
    )
    async with emulator, kmock.Server(emulator) as server:
        yield Cluster(emulator, str(server.url).rstrip("/"))


def container(sts: dict[str, Any]) -> dict[str, Any]:
    return sts["spec"]["template"]["spec"]["containers"][0]


def condition(body: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for cond in ((body or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return cond
    return None


async def test_create_renders_children_and_status(cluster: Cluster) -> None:
    async with cluster.operator():
        await cluster.create(pipeline("sd", stages={"denoiser": {"replicas": 2, "maxReplicas": 4}}))
        sts = await eventually(lambda: cluster.get(STS, "sd-denoiser"))
        assert sts["spec"]["replicas"] == 2
        owner = sts["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "DiffusionPipeline" and owner["name"] == "sd" and owner["uid"]
        enc = await eventually(lambda: cluster.get(STS, "sd-encoder"))
        args = container(enc)["args"]
        nxt = args[args.index("--next") + 1].split(",")
        assert nxt[0] == "sd-denoiser-0.sd-denoiser.ml.svc:50051" and len(nxt) == 4
        for name in STAGES:
            await eventually(partial(cluster.get, SVC, f"sd-{name}"))
        await eventually(lambda: cluster.get(DEPLOY, "sd-gateway"))
        await eventually(lambda: cluster.get(SVC, "sd-gateway"))
        await eventually(lambda: cluster.get(CM, "sd-topology"))
        body = await eventually(
            lambda: condition(cluster.get(CRD, "sd"), "Ready") and cluster.get(CRD, "sd")
        )
        assert condition(body, "Ready")["status"] == "False"  # type: ignore[index]
        assert body["status"]["stages"]["denoiser"]["desiredReplicas"] == 2
        assert body["status"]["gateway"]["endpoint"] == "http://sd-gateway.ml.svc:8000"

        # The StatefulSet controller would report ready replicas; Ready follows.
        for name, count in (("encoder", 1), ("denoiser", 2), ("decoder", 1)):
            await cluster.patch(
                f"/apis/apps/v1/namespaces/{NS}/statefulsets/sd-{name}/status",
                {
                    "status": {
                        "replicas": count,
                        "readyReplicas": count,
                        "updatedReplicas": count,
                        "observedGeneration": 1,
                    }
                },
            )
        await cluster.patch(
            f"/apis/apps/v1/namespaces/{NS}/deployments/sd-gateway/status",
            {
                "status": {
                    "replicas": 1,
                    "readyReplicas": 1,
                    "updatedReplicas": 1,
                    "observedGeneration": 1,
                }
            },
        )
        await eventually(
            lambda: (condition(cluster.get(CRD, "sd"), "Ready") or {}).get("status") == "True"
        )


async def test_update_changes_children(cluster: Cluster) -> None:
    path = f"/apis/disagfusion.io/v1alpha1/namespaces/{NS}/diffusionpipelines/sd"
    async with cluster.operator():
        await cluster.create(pipeline("sd"))
        await eventually(lambda: cluster.get(STS, "sd-decoder"))
        await cluster.patch(
            path,
            {
                "spec": {
                    "image": "registry.local/df:2",
                    "stages": {
                        "decoder": {
                            "replicas": 3,
                            "maxReplicas": 3,
                            "resources": {"limits": {"nvidia.com/gpu": 1}},
                        }
                    },
                }
            },
        )

        def updated() -> bool:
            sts = cluster.get(STS, "sd-decoder") or {}
            c = container(sts)
            return (
                sts["spec"]["replicas"] == 3
                and c["image"] == "registry.local/df:2"
                and c["resources"]["limits"]["nvidia.com/gpu"] == 1
                and "--device" in c["args"]
            )

        await eventually(updated)
        den = container(cluster.get(STS, "sd-denoiser") or {})
        assert den["image"] == "registry.local/df:2"
        assert den["args"][den["args"].index("--next") + 1].count(",") == 2


async def test_delete_cleans_up_children(cluster: Cluster) -> None:
    path = f"/apis/disagfusion.io/v1alpha1/namespaces/{NS}/diffusionpipelines/sd"
    async with cluster.operator():
        await cluster.create(pipeline("sd"))
        await eventually(lambda: cluster.get(SVC, "sd-gateway"))
        await cluster.delete(path)
        await eventually(lambda: cluster.get(STS, "sd-denoiser") is None)
        assert cluster.get(CRD, "sd") is None
        await eventually(lambda: cluster.get(DEPLOY, "sd-gateway") is None)
        await eventually(lambda: cluster.get(CM, "sd-topology") is None)


async def test_bad_spec_sets_condition_and_event_others_keep_working(cluster: Cluster) -> None:
    async with cluster.operator():
        await cluster.create(pipeline("bad", stages={"encoder": {"replicas": 5, "maxReplicas": 2}}))
        await cluster.create(pipeline("good"))
        body = await eventually(
            lambda: condition(cluster.get(CRD, "bad"), "InvalidSpec") and cluster.get(CRD, "bad")
        )
        invalid = condition(body, "InvalidSpec")
        assert invalid is not None and invalid["status"] == "True"
        assert "spec.stages.encoder.replicas" in invalid["message"]
        events = await eventually(
            lambda: [
                obj.raw
                for key, obj in cluster.emulator.objects.items()
                if key[0] == EVENTS and not obj.deleted and obj.raw.get("reason") == "InvalidSpec"
            ]
        )
        assert events[0]["type"] == "Warning"
        assert events[0]["involvedObject"]["name"] == "bad"
        await eventually(lambda: cluster.get(DEPLOY, "good-gateway"))
        assert cluster.get(STS, "bad-encoder") is None
        assert cluster.metrics.reconcile_total.labels(result="invalid")._value.get() >= 1


async def test_drift_is_repaired(cluster: Cluster) -> None:
    async with cluster.operator(timer_interval=0.3):
        await cluster.create(pipeline("sd"))
        sts = await eventually(lambda: cluster.get(STS, "sd-denoiser"))
        want = container(sts)["image"]
        await cluster.patch(
            f"/apis/apps/v1/namespaces/{NS}/statefulsets/sd-denoiser",
            {
                "spec": {
                    "replicas": 7,
                    "template": {
                        "spec": {"containers": [{**container(sts), "image": "evil:latest"}]}
                    },
                }
            },
        )
        await eventually(
            lambda: (
                container(cluster.get(STS, "sd-denoiser") or {})["image"] == want
                and (cluster.get(STS, "sd-denoiser") or {})["spec"]["replicas"] == 1
            )
        )
        await cluster.delete(f"/api/v1/namespaces/{NS}/services/sd-gateway")
        await eventually(lambda: cluster.get(SVC, "sd-gateway"))


async def test_restart_adopts_children_without_rewriting(cluster: Cluster) -> None:
    async with cluster.operator(timer_interval=60):
        await cluster.create(pipeline("sd"))
        await eventually(
            lambda: (
                cluster.get(SVC, "sd-gateway")
                and cluster.get(CRD, "sd")
                and condition(cluster.get(CRD, "sd"), "Ready")
            )
        )
    before = {res: cluster.writes(res) for res in (STS, DEPLOY, SVC, CM)}
    hashes = (cluster.get(STS, "sd-encoder") or {})["metadata"]["annotations"][HASH_ANNOTATION]
    resumed = cluster.metrics.reconcile_total.labels(result="ok")._value.get()
    async with cluster.operator(timer_interval=60):
        # The resume handler reconciles once more: wait for it, then check it wrote nothing.
        await eventually(
            lambda: cluster.metrics.reconcile_total.labels(result="ok")._value.get() > resumed
        )
    assert {res: cluster.writes(res) for res in (STS, DEPLOY, SVC, CM)} == before
    assert (cluster.get(STS, "sd-encoder") or {})["metadata"]["annotations"][
        HASH_ANNOTATION
    ] == hashes
