"""The operator end to end against KMock (tests/operator/emulator.py): create,
update, scale, delete, bad specs, drift and restarts."""

from __future__ import annotations

from functools import partial

import pytest

from disagfusion.operator.render import HASH_ANNOTATION
from tests.operator.emulator import (
    CM,
    CRD,
    DEPLOY,
    EVENTS,
    NS,
    STAGES,
    STS,
    SVC,
    Cluster,
    condition,
    container,
    eventually,
    pipeline,
)

# A hang fails fast instead of stalling the suite.
pytestmark = pytest.mark.timeout(60)


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


async def test_a_spec_scale_rewrites_only_the_statefulset(cluster: Cluster) -> None:
    """The topology lists addresses up to maxReplicas: a replica change within it is
    one StatefulSet write, not a ConfigMap (or gateway, or Service) rewrite."""
    path = f"/apis/disagfusion.io/v1alpha1/namespaces/{NS}/diffusionpipelines/sd"
    async with cluster.operator():
        await cluster.create(pipeline("sd", stages={"denoiser": {"replicas": 1, "maxReplicas": 4}}))
        await eventually(lambda: cluster.get(CM, "sd-topology") and cluster.get(SVC, "sd-gateway"))
        others = (CM, DEPLOY, SVC)
        before = {res: cluster.writes(res) for res in others}
        topology = (cluster.get(CM, "sd-topology") or {})["data"]
        await cluster.patch(path, {"spec": {"stages": {"denoiser": {"replicas": 3}}}})
        await eventually(lambda: (cluster.get(STS, "sd-denoiser") or {})["spec"]["replicas"] == 3)
        done = cluster.metrics.reconcile_total.labels(result="ok")._value.get()
        # A reconcile after the scale (the drift timer) finds nothing more to write.
        await eventually(
            lambda: cluster.metrics.reconcile_total.labels(result="ok")._value.get() > done
        )
        assert {res: cluster.writes(res) for res in others} == before
        assert (cluster.get(CM, "sd-topology") or {})["data"] == topology


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
