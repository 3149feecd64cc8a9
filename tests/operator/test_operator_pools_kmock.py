"""Heterogeneous pools end to end against KMock: a StatefulSet per pool behind the
stage's one Service, status per pool, pools sized independently (by the spec and by the
autoscaler), a removed pool's StatefulSet deleted."""

from __future__ import annotations

from typing import Any

import pytest

from tests.operator.emulator import CRD, NS, STS, SVC, Cluster, container, eventually, pipeline
from tests.operator.test_autoscale_operator import FakePrometheus, operator

pytestmark = pytest.mark.timeout(90)
PATH = f"/apis/disagfusion.io/v1alpha1/namespaces/{NS}/diffusionpipelines/sd"
H100 = {"name": "h100", "accelerator": "H100", "replicas": 1, "minReplicas": 1, "maxReplicas": 3}
L40S = {"name": "l40s", "accelerator": "L40S", "replicas": 1, "minReplicas": 0, "maxReplicas": 2}


def pooled(*pools: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return pipeline("sd", stages={"denoiser": {"pools": list(pools)}}, **spec)


def writes_of(cluster: Cluster, name: str) -> int:
    """Writes (create or patch) of one StatefulSet."""
    count = 0
    for r in cluster.emulator._requests:
        data = r.data if isinstance(r.data, dict) else {}
        named = r.name or (data.get("metadata") or {}).get("name")  # a POST names it in the body
        if r.resource == STS and r.method in ("POST", "PATCH", "PUT") and named == name:
            count += 1
    return count


def replicas(cluster: Cluster, name: str) -> int | None:
    sts = cluster.get(STS, name)
    return None if sts is None else int(sts["spec"]["replicas"])


def pool_status(cluster: Cluster) -> dict[str, dict[str, Any]]:
    status = (cluster.get(CRD, "sd") or {}).get("status") or {}
    return {p["name"]: p for p in (status.get("pools") or {}).get("denoiser") or []}


async def test_pools_render_report_and_scale_independently(cluster: Cluster) -> None:
    async with cluster.operator(timer_interval=0.3):
        await cluster.create(pooled({**H100, "replicas": 2}, L40S))
        await eventually(lambda: cluster.get(STS, "sd-denoiser-h100"))
        await eventually(lambda: cluster.get(STS, "sd-denoiser-l40s"))
        assert cluster.get(STS, "sd-denoiser") is None
        svc = await eventually(lambda: cluster.get(SVC, "sd-denoiser"))
        for name in ("sd-denoiser-h100", "sd-denoiser-l40s"):
            sts = cluster.get(STS, name) or {}
            assert sts["spec"]["serviceName"] == "sd-denoiser"
            labels = sts["spec"]["template"]["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        assert (replicas(cluster, "sd-denoiser-h100"), replicas(cluster, "sd-denoiser-l40s")) == (
            2,
            1,
        )
        args = container(cluster.get(STS, "sd-encoder") or {})["args"]
        peers = args[args.index("--next") + 1].split(",")
        assert peers == [
            *(f"sd-denoiser-h100-{i}.sd-denoiser.ml.svc:50051" for i in range(3)),
            *(f"sd-denoiser-l40s-{i}.sd-denoiser.ml.svc:50051" for i in range(2)),
        ]

        # The StatefulSet controller reports the h100 pool ready: status says so per pool.
        await cluster.patch(
            f"/apis/apps/v1/namespaces/{NS}/statefulsets/sd-denoiser-h100/status",
            {"status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}},
        )
        pools = await eventually(
            lambda: (
                (pool_status(cluster).get("h100") or {}).get("readyReplicas") == 2
                and pool_status(cluster)
            )
        )
        assert pools["h100"] == {
            "name": "h100",
            "accelerator": "H100",
            "statefulSet": "sd-denoiser-h100",
            "replicas": 2,
            "readyReplicas": 2,
            "desiredReplicas": 2,
        }
        assert (pools["l40s"]["readyReplicas"], pools["l40s"]["desiredReplicas"]) == (0, 1)
        stage = (cluster.get(CRD, "sd") or {})["status"]["stages"]["denoiser"]
        assert (stage["readyReplicas"], stage["desiredReplicas"]) == (2, 3)

        # One pool's replicas change: only its StatefulSet is written.
        h100_writes = writes_of(cluster, "sd-denoiser-h100")
        await cluster.patch(
            PATH,
            {
                "spec": {
                    "stages": {
                        "denoiser": {"pools": [{**H100, "replicas": 2}, {**L40S, "replicas": 2}]}
                    }
                }
            },
        )
        await eventually(lambda: replicas(cluster, "sd-denoiser-l40s") == 2)
        done = cluster.metrics.reconcile_total.labels(result="ok")._value.get()
        await eventually(
            lambda: cluster.metrics.reconcile_total.labels(result="ok")._value.get() > done + 1
        )
        assert writes_of(cluster, "sd-denoiser-h100") == h100_writes
        assert replicas(cluster, "sd-denoiser-h100") == 2

        # A pool that leaves the spec takes its StatefulSet with it.
        await cluster.patch(PATH, {"spec": {"stages": {"denoiser": {"pools": [H100]}}}})
        await eventually(lambda: cluster.get(STS, "sd-denoiser-l40s") is None)
        await eventually(lambda: set(pool_status(cluster)) == {"h100"})
        assert replicas(cluster, "sd-denoiser-h100") == 1


async def test_the_autoscaler_grows_only_the_pools_it_must(cluster: Cluster) -> None:
    with FakePrometheus("sd").running() as prom:
        async with operator(cluster, prometheus_url=prom.url):
            await cluster.create(
                pooled(
                    H100,
                    L40S,
                    autoscaling={
                        "mode": "Active",
                        "profile": "builtin:qwen-image-h100-l40s",
                        "intervalSeconds": 0.2,
                    },
                )
            )
            await eventually(lambda: replicas(cluster, "sd-denoiser-l40s") == 1)
            await eventually(lambda: replicas(cluster, "sd-denoiser-h100") == 1)
            l40s_writes = writes_of(cluster, "sd-denoiser-l40s")
            # Four denoisers wanted (two queued per instance): the first pool grows to 3,
            # the second keeps its one replica and is never written.
            prom.set_queue(denoiser=8)
            await eventually(lambda: replicas(cluster, "sd-denoiser-h100") == 3)
            auto = (cluster.get(CRD, "sd") or {})["status"]["autoscaling"]
            assert auto["replicas"]["denoiser"] == 4
            assert replicas(cluster, "sd-denoiser-l40s") == 1
            assert writes_of(cluster, "sd-denoiser-l40s") == l40s_writes
            # Past the first pool's max, the next pool takes the rest (up to its own max).
            prom.set_queue(denoiser=20)
            await eventually(lambda: replicas(cluster, "sd-denoiser-l40s") == 2)
            assert replicas(cluster, "sd-denoiser-h100") == 3


class RatePrometheus(FakePrometheus):
    """FakePrometheus whose gateway arrival rate is `self.rate` requests/s."""

    rate = 1.0

    def answer(self, key: str) -> dict[str, Any]:
        out = super().answer(key)
        if key == "arrivals":
            out["result"][0]["value"][1] = str(self.rate)
        return out


async def test_the_default_policy_sizes_each_pool_on_its_own(cluster: Cluster) -> None:
    """The operator's own policy (no test policy) over pools: under a 60 s SLO an L40S
    denoise (68 s) misses, so the L40S pool, listed first, is emptied and the H100 pool
    grows; a split of one stage size in list order could never do that."""
    l40s = {**L40S, "replicas": 2, "maxReplicas": 4}
    h100 = {**H100, "replicas": 1, "maxReplicas": 6}
    prom = RatePrometheus("sd")
    prom.rate = 0.1
    with prom.running():
        async with operator(cluster, prometheus_url=prom.url, policy=None) as ctx:
            del ctx
            await cluster.create(
                pooled(
                    l40s,
                    h100,
                    autoscaling={
                        "mode": "Active",
                        "profile": "builtin:qwen-image-h100-l40s",
                        "slo": "60s",
                        "intervalSeconds": 0.2,
                    },
                )
            )
            await eventually(lambda: replicas(cluster, "sd-denoiser-l40s") == 0)
            await eventually(lambda: (replicas(cluster, "sd-denoiser-h100") or 0) >= 2)
            auto = (cluster.get(CRD, "sd") or {})["status"]["autoscaling"]
            assert auto["policy"] == "hybrid-pools"
            assert auto["pools"]["denoiser"]["l40s"] == 0
            assert auto["pools"]["denoiser"]["h100"] == replicas(cluster, "sd-denoiser-h100")
            stage = auto["stages"]["denoiser"]
            assert stage["desiredPools"] == auto["pools"]["denoiser"]
            assert "H100" in stage["reason"]
            # Pool status follows, and the sizes survive a reconcile (drift repair).
            await eventually(lambda: pool_status(cluster)["l40s"]["desiredReplicas"] == 0)
            await cluster.patch(
                f"/apis/apps/v1/namespaces/{NS}/statefulsets/sd-denoiser-l40s",
                {"spec": {"replicas": 3}},
            )
            await eventually(lambda: replicas(cluster, "sd-denoiser-l40s") == 0)
