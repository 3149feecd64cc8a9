"""The autoscale timer end to end against KMock, with a Prometheus HTTP API double.

The double answers the exact PromQL observe.queries() sends, with values each
test sets (or 503 / a closed port to play an unreachable Prometheus). The
policy is a small queue-driven one passed through the Context, so the tests
check the glue (gather → decide → apply → status/Events/metrics), not the
sizing model; tests/operator/test_autoscale_prometheus.py runs the production
HybridPolicy against a real Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import kopf
import pytest

from disagfusion.operator.autoscale.observe import per_stage, queries
from disagfusion.operator.autoscale.prometheus import Prometheus, PrometheusError
from disagfusion.operator.context import Context
from disagfusion.operator.handlers import build_registry
from disagfusion.operator.kube import Kube
from disagfusion.operator.spec import DEFAULT_IMAGE, SpecDefaults
from disagfusion.scheduling.profile import Profile
from disagfusion.scheduling.scaling import (
    Decision,
    Knobs,
    Policy,
    PolicyBase,
    Snapshot,
    StageDecision,
)
from disagfusion.worker.local.launcher import free_port
from tests.operator.emulator import (
    CM,
    CRD,
    DEPLOY,
    EVENTS,
    NS,
    STS,
    WAIT_S,
    Cluster,
    condition,
    container,
    eventually,
    pipeline,
)
from tests.operator.kubeconfig import kubeconfig_env

pytestmark = pytest.mark.timeout(90)
WINDOW = "10s"
PATH = f"/apis/disagfusion.io/v1alpha1/namespaces/{NS}/diffusionpipelines"


class QueuePolicy(PolicyBase):
    """Two queued payloads per instance; holds on stale metrics like any policy must."""

    name = "queue-test"

    def initial_state(self) -> int:
        return 0

    def decide(self, snapshot: Snapshot, state: int, profile: Profile, knobs: Knobs) -> Decision:
        del profile
        age = snapshot.metrics_age_s
        ok = age is not None and age <= knobs.stale_after_s
        stages = {}
        for s, obs in snapshot.stages.items():
            if not ok or obs.queue_depth is None:
                want, why = obs.desired, "hold"
            else:
                want = max(knobs.min_for(s), math.ceil(obs.queue_depth / 2))
                why = f"queue {obs.queue_depth:g}"
            cap = knobs.max_for(s, 100)
            stages[s] = StageDecision(
                min(want, cap), "H100", want, why, "max" if want > cap else ""
            )
        return Decision(stages=stages, state=state + 1, metrics_ok=ok)


class FakePrometheus:
    """/api/v1/query answering observe.queries() for one pipeline from `self.values`."""

    def __init__(self, name: str) -> None:
        self.by_query = {q: key for key, q in queries(name, NS, WINDOW).items()}
        self.values: dict[str, Any] = {"queue": {"encoder": 0, "denoiser": 0, "decoder": 0}}
        self.failing = False
        self.asked = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.asked += 1
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                key = outer.by_query.get(query.get("query", [""])[0])
                if outer.failing or key is None:
                    self.send_response(503 if outer.failing else 400)
                    self.end_headers()
                    return
                body = json.dumps({"status": "success", "data": outer.answer(key)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, key: str) -> dict[str, Any]:
        now = time.time()
        if key == "newest":
            items: list[tuple[dict[str, str], float]] = [({}, now - 1)]
        elif key in ("arrivals", "gateway"):
            items = [({}, 1.0)]
        elif isinstance(self.values.get(key), dict):
            items = [({"stage": s}, float(v)) for s, v in self.values[key].items()]
        else:
            items = []
        return {
            "resultType": "vector",
            "result": [{"metric": m, "value": [now, str(v)]} for m, v in items],
        }

    def set_queue(self, **depths: int) -> None:
        self.values["queue"] = {**self.values["queue"], **depths}

    @contextlib.contextmanager
    def running(self) -> Iterator[FakePrometheus]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join()


QUEUE_POLICY = QueuePolicy()


@contextlib.asynccontextmanager
async def operator(
    cluster: Cluster,
    timer_interval: float = 0.3,
    prometheus_url: str | None = None,
    policy: Policy | None = QUEUE_POLICY,
    worker_image: str = DEFAULT_IMAGE,
) -> AsyncIterator[Context]:
    """Like Cluster.operator, with the autoscaler's collaborators in the Context.

    `policy` None: the production default (HybridPolicy). `worker_image`: the
    operator's image for pipelines without spec.image (the chart's
    DISAGFUSION_WORKER_IMAGE).
    """
    registry = build_registry(timer_interval=timer_interval, autoscale_tick=0.1)

    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 60
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 0.5
    stop, ready = asyncio.Event(), asyncio.Event()
    kube = Kube.for_host(cluster.url, timeout_s=5)
    ctx = Context(
        kube=kube,
        metrics=cluster.metrics,
        policy=policy,
        prometheus_url=prometheus_url,
        rate_window=WINDOW,
        prometheus_timeout_s=2,
        spec_defaults=SpecDefaults(image=worker_image),
    )
    env = contextlib.ExitStack()
    env.enter_context(kubeconfig_env(cluster.url))  # kopf logs in as in production
    task = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings,
            clusterwide=True,
            standalone=True,
            memo=kopf.Memo(context=ctx),
            stop_flag=stop,
            ready_flag=ready,
        )
    )
    await asyncio.wait_for(ready.wait(), WAIT_S)
    try:
        yield ctx
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)
        kube.close()
        env.close()


def autoscaled(
    name: str, mode: str, url: str, max_replicas: int = 4, **knobs: Any
) -> dict[str, Any]:
    return pipeline(
        name,
        stages={"denoiser": {"replicas": 1, "maxReplicas": max_replicas}},
        autoscaling={
            "mode": mode,
            "prometheusUrl": url,
            "profile": "builtin:qwen-image-h100",
            "intervalSeconds": 0.2,
            **knobs,
        },
    )


def replicas(cluster: Cluster, name: str) -> int | None:
    sts = cluster.get(STS, name)
    return None if sts is None else int(sts["spec"]["replicas"])


def auto_status(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict(((cluster.get(CRD, name) or {}).get("status") or {}).get("autoscaling") or {})


def cond_status(cluster: Cluster, name: str, type_: str) -> str | None:
    found = condition(cluster.get(CRD, name), type_)
    return None if found is None else str(found["status"])


def events(cluster: Cluster, reason: str) -> list[dict[str, Any]]:
    return [
        obj.raw
        for key, obj in cluster.emulator.objects.items()
        if key[0] == EVENTS and not obj.deleted and obj.raw.get("reason") == reason
    ]


def sts_replica_writes(cluster: Cluster, name: str) -> list[int]:
    """The replicas of every write of a StatefulSet, in order."""
    out = []
    for r in cluster.emulator._requests:
        data = r.data if isinstance(r.data, dict) else {}
        named = r.name or (data.get("metadata") or {}).get("name")  # a POST names it in the body
        if r.resource == STS and r.method in ("POST", "PATCH", "PUT") and named == name:
            replicas_ = (data.get("spec") or {}).get("replicas")
            if replicas_ is not None:
                out.append(int(replicas_))
    assert out, f"no write of {name} seen"
    return out


async def test_active_scales_records_status_events_and_survives_drift(cluster: Cluster) -> None:
    with FakePrometheus("sd").running() as prom:
        async with operator(cluster, prometheus_url=prom.url) as ctx:
            # The spec's URL wins over the operator's default (which points nowhere).
            ctx.prometheus_url = "http://127.0.0.1:1"
            await cluster.create(autoscaled("sd", "Active", prom.url))
            await eventually(lambda: cond_status(cluster, "sd", "MetricsAvailable") == "True")
            await eventually(lambda: replicas(cluster, "sd-denoiser") == 1)
            assert cond_status(cluster, "sd", "ScalingActive") == "True"

            prom.set_queue(denoiser=6)
            await eventually(lambda: replicas(cluster, "sd-denoiser") == 3)
            status = await eventually(
                lambda: (
                    (auto_status(cluster, "sd").get("stages") or {})
                    .get("denoiser", {})
                    .get("currentReplicas")
                    == 3
                    and auto_status(cluster, "sd")
                )
            )
            den = status["stages"]["denoiser"]
            assert (den["desiredReplicas"], den["predictedReplicas"]) == (3, 3)
            assert den["reason"] == "queue 6"
            assert status["replicas"] == {"encoder": 1, "denoiser": 3, "decoder": 1}
            assert status["lastScaleTime"] and status["policy"] == "queue-test"
            last = status["history"][-1]
            assert (last["stage"], last["from"], last["to"], last["applied"]) == (
                "denoiser",
                1,
                3,
                True,
            )
            scaled = await eventually(lambda: events(cluster, "Scaled"))
            assert len(scaled) == 1 and "denoiser 1 -> 3" in scaled[0]["message"]

            # Past maxReplicas: capped, and ScalingLimited says so.
            prom.set_queue(denoiser=20)
            await eventually(lambda: replicas(cluster, "sd-denoiser") == 4)
            await eventually(lambda: cond_status(cluster, "sd", "ScalingLimited") == "True")
            await eventually(lambda: len(events(cluster, "Scaled")) == 2)

            # Drift repair (every 0.3 s) renders the autoscaler's size, not the spec's 1.
            rounds = cluster.metrics.reconcile_total.labels(result="ok")._value.get()
            await eventually(
                lambda: (
                    cluster.metrics.reconcile_total.labels(result="ok")._value.get() >= rounds + 3
                )
            )
            assert replicas(cluster, "sd-denoiser") == 4
            assert 1 not in sts_replica_writes(cluster, "sd-denoiser")[1:]
            scaling = ctx.metrics.scaling
            assert scaling.desired.labels(NS, "sd", "denoiser")._value.get() == 4
            assert scaling.metrics_available.labels(NS, "sd")._value.get() == 1
            up = scaling.decisions.labels(NS, "sd", "denoiser", "up", "load", "true")
            assert up._value.get() == 1
            assert len(auto_status(cluster, "sd")["history"]) == 2
            assert len(events(cluster, "Scaled")) == 2  # one per scale, not one per round
            # The topology ConfigMap lists maxReplicas addresses: created once, never
            # rewritten by a scale (nor is the gateway it would roll).
            assert cluster.writes(CM) == 1
            assert cluster.writes(DEPLOY) == 1


async def test_a_scale_keeps_the_operators_worker_image(cluster: Cluster) -> None:
    """The chart's DISAGFUSION_WORKER_IMAGE (pipelines without spec.image): the
    autoscaler's StatefulSets render it as reconcile does, so the two never fight
    over the image (each rewrite would roll every pod)."""
    image = "registry.example/disagfusion-worker:9.9"
    with FakePrometheus("sd").running() as prom:
        async with operator(cluster, prometheus_url=prom.url, worker_image=image):
            await cluster.create(autoscaled("sd", "Active", prom.url))
            await eventually(lambda: replicas(cluster, "sd-denoiser") == 1)
            prom.set_queue(denoiser=6)
            await eventually(lambda: replicas(cluster, "sd-denoiser") == 3)
            rounds = cluster.metrics.reconcile_total.labels(result="ok")._value.get()
            await eventually(
                lambda: (
                    cluster.metrics.reconcile_total.labels(result="ok")._value.get() >= rounds + 3
                )
            )
            sts = cluster.get(STS, "sd-denoiser") or {}
            assert container(sts)["image"] == image
            written = [
                container(r.data)["image"]
                for r in cluster.emulator._requests
                if r.resource == STS
                and r.method in ("POST", "PATCH", "PUT")
                and isinstance(r.data, dict)
                and (r.data.get("spec") or {}).get("template")
            ]
            assert written and set(written) == {image}, written  # never another image


async def test_advisory_reports_but_never_patches_replicas(cluster: Cluster) -> None:
    with FakePrometheus("sd").running() as prom:
        prom.set_queue(denoiser=6)
        async with operator(cluster) as ctx:
            await cluster.create(autoscaled("sd", "Advisory", prom.url))
            status = await eventually(
                lambda: (
                    (auto_status(cluster, "sd").get("stages") or {})
                    .get("denoiser", {})
                    .get("desiredReplicas")
                    == 3
                    and auto_status(cluster, "sd")
                )
            )
            assert status["stages"]["denoiser"]["currentReplicas"] == 1
            assert "replicas" not in status and "lastScaleTime" not in status
            assert status["history"][-1]["applied"] is False
            advised = await eventually(lambda: events(cluster, "ScaleAdvised"))
            asked = prom.asked
            await eventually(lambda: prom.asked >= asked + 30)  # several more rounds
            assert replicas(cluster, "sd-denoiser") == 1
            assert set(sts_replica_writes(cluster, "sd-denoiser")) == {1}
            # The same advice is one Event and one history entry, not one per round.
            assert len(events(cluster, "ScaleAdvised")) == len(advised) == 1
            assert len(auto_status(cluster, "sd")["history"]) == 1
            assert cond_status(cluster, "sd", "ScalingActive") == "False"
            assert (condition(cluster.get(CRD, "sd"), "ScalingActive") or {})[
                "reason"
            ] == "Advisory"
            assert ctx.metrics.scaling.desired.labels(NS, "sd", "denoiser")._value.get() == 3
            assert events(cluster, "Scaled") == []


async def test_stale_metrics_hold_sizes(cluster: Cluster) -> None:
    with FakePrometheus("sd").running() as prom:
        prom.set_queue(denoiser=6)
        async with operator(cluster) as ctx:
            await cluster.create(autoscaled("sd", "Active", prom.url))
            await eventually(lambda: replicas(cluster, "sd-denoiser") == 3)
            # Prometheus goes away mid-flight: hold 3 (not the spec's 1, never 0).
            prom.failing = True
            await eventually(lambda: cond_status(cluster, "sd", "MetricsAvailable") == "False")
            metrics_cond = condition(cluster.get(CRD, "sd"), "MetricsAvailable") or {}
            assert metrics_cond["reason"] == "MetricsUnavailable"
            assert "503" in metrics_cond["message"]
            assert cond_status(cluster, "sd", "ScalingActive") == "False"
            prom.set_queue(denoiser=0)  # ignored: the answer never arrives
            rounds = ctx.metrics.scaling.rounds.labels(result="no_metrics")._value.get()
            await eventually(
                lambda: (
                    ctx.metrics.scaling.rounds.labels(result="no_metrics")._value.get()
                    >= rounds + 5
                )
            )
            assert replicas(cluster, "sd-denoiser") == 3
            assert auto_status(cluster, "sd")["replicas"]["denoiser"] == 3
            assert ctx.metrics.scaling.metrics_available.labels(NS, "sd")._value.get() == 0
            # Someone edits the StatefulSet meanwhile: the held size is put back.
            await cluster.patch(
                f"/apis/apps/v1/namespaces/{NS}/statefulsets/sd-denoiser", {"spec": {"replicas": 7}}
            )
            await eventually(lambda: replicas(cluster, "sd-denoiser") == 3)


async def test_unreachable_prometheus_from_the_start(cluster: Cluster) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with operator(cluster, prometheus_url=closed):
        body = autoscaled("sd", "Active", closed)
        del body["spec"]["autoscaling"]["prometheusUrl"]  # the operator's default applies
        body["spec"]["stages"]["denoiser"]["replicas"] = 2
        await cluster.create(body)
        await eventually(lambda: cond_status(cluster, "sd", "MetricsAvailable") == "False")
        assert replicas(cluster, "sd-denoiser") == 2
        assert auto_status(cluster, "sd")["replicas"]["denoiser"] == 2
        assert events(cluster, "Scaled") == []


async def test_restart_keeps_autoscaled_replicas(cluster: Cluster) -> None:
    with FakePrometheus("sd").running() as prom:
        prom.set_queue(denoiser=8)
        async with operator(cluster):
            await cluster.create(autoscaled("sd", "Active", prom.url))
            await eventually(lambda: replicas(cluster, "sd-denoiser") == 4)
            await eventually(lambda: auto_status(cluster, "sd").get("replicas"))
        # A new operator process (fresh memory) while Prometheus is down: resume and
        # drift reconcile render the persisted size, the autoscaler holds it.
        prom.failing = True
        resumed = cluster.metrics.reconcile_total.labels(result="ok")._value.get()
        async with operator(cluster):
            await eventually(
                lambda: (
                    cluster.metrics.reconcile_total.labels(result="ok")._value.get() >= resumed + 3
                )
            )
            await eventually(lambda: cond_status(cluster, "sd", "MetricsAvailable") == "False")
            assert replicas(cluster, "sd-denoiser") == 4
            assert 1 not in sts_replica_writes(cluster, "sd-denoiser")[1:]


async def test_disabled_does_nothing_and_clears_what_active_left(cluster: Cluster) -> None:
    with FakePrometheus("sd").running() as prom:
        prom.set_queue(denoiser=6)
        async with operator(cluster):
            await cluster.create(autoscaled("sd", "Disabled", prom.url))
            await eventually(lambda: condition(cluster.get(CRD, "sd"), "Ready"))
            ticks = cluster.metrics.reconcile_total.labels(result="ok")._value.get()
            await eventually(
                lambda: (
                    cluster.metrics.reconcile_total.labels(result="ok")._value.get() >= ticks + 2
                )
            )
            assert prom.asked == 0 and "autoscaling" not in cluster.get(CRD, "sd")["status"]  # type: ignore[index]

            await cluster.patch(f"{PATH}/sd", {"spec": {"autoscaling": {"mode": "Active"}}})
            await eventually(lambda: replicas(cluster, "sd-denoiser") == 3)
            await cluster.patch(f"{PATH}/sd", {"spec": {"autoscaling": {"mode": "Disabled"}}})
            # Back to the spec's size; the autoscaler's status and conditions are gone.
            await eventually(lambda: replicas(cluster, "sd-denoiser") == 1)
            await eventually(lambda: not auto_status(cluster, "sd"))
            await eventually(lambda: cond_status(cluster, "sd", "ScalingActive") is None)
            assert cond_status(cluster, "sd", "Ready") is not None


def test_prometheus_client_answers_and_typed_errors() -> None:
    with FakePrometheus("sd").running() as prom:
        client = Prometheus(prom.url, timeout_s=2)
        prom.set_queue(denoiser=4)
        answers = client.query_all(queries("sd", NS, WINDOW))
        assert per_stage(answers["queue"])["denoiser"] == 4.0
        with pytest.raises(PrometheusError, match="HTTP 400"):
            client.query("up")  # the double knows only the autoscaler's queries
        prom.failing = True
        with pytest.raises(PrometheusError, match="HTTP 503"):
            client.query_all(queries("sd", NS, WINDOW))
    with pytest.raises(PrometheusError, match=r"127\.0\.0\.1"):
        Prometheus(f"http://127.0.0.1:{free_port()}", timeout_s=2).query("up")
