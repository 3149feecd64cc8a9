"""kopf handlers: gather → validate → render → apply → status, nothing more.

One reconcile function serves create, update, resume (operator restart: it
adopts existing children, writing nothing whose input hash and owned fields
match) and a periodic timer (drift repair: an edited or deleted child is put
back). A bad spec sets `InvalidSpec=True` and posts a Warning Event; the
handler returns without raising, so there is no retry loop and other
pipelines are unaffected.

Deletion: every child carries an owner reference to its DiffusionPipeline
(controller=true, blockOwnerDeletion=true), so Kubernetes' garbage collector
removes them with the pipeline. A handler on the DELETED event also deletes
the children it still finds owned by that pipeline (for API servers without
a garbage collector, e.g. emulators). There is no deletion handler of ours,
but kopf puts its own finalizer on every pipeline because of the drift timer
(kopf timers always require one) and removes it when the pipeline is deleted;
a pipeline deleted while no operator runs stays Terminating until an operator
runs again or the `disagfusion.io/operator` finalizer is removed by hand.

Pools: a stage with spec.stages.<stage>.pools has one StatefulSet per pool;
status.stages.<stage> sums them and status.pools.<stage> lists each. A pool
that leaves the spec has its StatefulSet deleted: the last status names it.

kopf's own bookkeeping (progress, last-handled configuration) lives in
annotations prefixed `disagfusion.io/`.

Autoscaling (operator/autoscale/timer.py) runs on its own timer. In Active
mode the sizes it sets are kept in `status.autoscaling.replicas`, and
reconcile renders those instead of spec.stages[].replicas (autoscale/plan.py's
`rendered_sizes`), so drift repair and an operator restart keep them. Both
writers of a pipeline's status hold the pipeline's lock and start from the
last status this process wrote (a watch event may not have brought it back
yet), so neither drops the other's conditions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from disagfusion.operator import conditions as cond
from disagfusion.operator.autoscale.plan import autoscaled_pools, rendered_sizes
from disagfusion.operator.autoscale.timer import autoscale
from disagfusion.operator.children import render_all
from disagfusion.operator.context import Context, utc_now
from disagfusion.operator.kube import Kube, KubeError
from disagfusion.operator.netpol import stale_network_policies
from disagfusion.operator.render import (
    GROUP,
    PLURAL,
    VERSION,
    Child,
    Owner,
    gateway_endpoint,
    gateway_name,
    pool_name,
    stage_pool_sizes,
)
from disagfusion.operator.spec import (
    STAGES,
    PipelineSpec,
    PoolSpec,
    SpecDefaults,
    SpecError,
    parse_spec,
    spec_warnings,
)

log = logging.getLogger(__name__)
DEFAULT_TIMER_INTERVAL_S = 30.0
DEFAULT_AUTOSCALE_TICK_S = 1.0
FINALIZER = "disagfusion.io/operator"


def reconcile(ctx: Context, body: Mapping[str, Any], now: str | None = None) -> str:
    """Bring one pipeline's children and status in line with its spec; returns the result."""
    started = time.perf_counter()
    try:
        result = _reconcile(ctx, body, now or utc_now())
    except KubeError as err:
        ctx.metrics.reconcile_total.labels(result="error").inc()
        ctx.metrics.reconcile_errors.labels(reason="api_error").inc()
        raise kopf.TemporaryError(str(err), delay=5) from err
    except Exception:
        ctx.metrics.reconcile_total.labels(result="error").inc()
        ctx.metrics.reconcile_errors.labels(reason="unexpected").inc()
        raise
    finally:
        ctx.metrics.reconcile_duration.observe(time.perf_counter() - started)
    ctx.metrics.reconcile_total.labels(result=result).inc()
    if result == "invalid":
        ctx.metrics.reconcile_errors.labels(reason="invalid_spec").inc()
    return result


def _reconcile(ctx: Context, body: Mapping[str, Any], now: str) -> str:
    uid = str((body.get("metadata") or {}).get("uid") or "")
    with ctx.lock(uid):
        return _reconcile_locked(ctx, body, now, uid)


def _reconcile_locked(ctx: Context, body: Mapping[str, Any], now: str, uid: str) -> str:
    meta = body.get("metadata") or {}
    name, namespace = str(meta["name"]), str(meta.get("namespace") or "default")
    generation = int(meta.get("generation") or 0)
    status = ctx.known_status(uid, body)
    old_conditions = list(status.get("conditions") or [])
    try:
        spec = parse_spec(body.get("spec"), ctx.spec_defaults)
    except SpecError as err:
        conditions = cond.apply_invalid(old_conditions, err.problems, now, generation)
        new_status = {**status, "observedGeneration": generation, "conditions": conditions}
        if _changed(status, new_status):
            ctx.write_status(namespace, name, uid, status, new_status)
            ctx.kube.event(body, "Warning", "InvalidSpec", str(err))
        log.warning("%s/%s: invalid spec: %s", namespace, name, err)
        return "invalid"

    owner = Owner(name=name, namespace=namespace, uid=uid)
    sizes = rendered_sizes(spec, status)
    pool_sizes = autoscaled_pools(spec, status)
    children = render_all(owner, spec, sizes, pool_sizes)
    changes = {child.kind + "/" + child.name: ctx.kube.apply(child) for child in children}
    written = {k: v for k, v in changes.items() if v != "unchanged"}
    if written:
        log.info(
            "%s/%s: %s", namespace, name, ", ".join(f"{v} {k}" for k, v in sorted(written.items()))
        )

    rendered = {c.name for c in children if c.kind == "StatefulSet"}
    _prune_pools(ctx, status, namespace, uid, rendered)
    for gone in stale_network_policies(owner, spec):  # spec.networkPolicy switched off
        if ctx.kube.delete_owned(gone, uid):
            log.info("%s/%s: deleted NetworkPolicy %s", namespace, name, gone.name)
    pools = _pool_states(ctx, spec, name, namespace, sizes, pool_sizes)
    gateway = cond.WorkloadState.from_object(
        "gateway",
        ctx.kube.get("apps/v1", "Deployment", namespace, gateway_name(name)),
        spec.gateway.replicas,
    )
    readiness = cond.evaluate([p.workload for st in STAGES for p in pools[st]] + [gateway])
    new_status = {
        "observedGeneration": generation,
        "conditions": cond.apply_readiness(old_conditions, readiness, now, generation),
        "stages": {stage: _stage_status(pools[stage]) for stage in STAGES},
        "pools": {
            stage: [_pool_status(spec, stage, state) for state in pools[stage]] for stage in STAGES
        },
        "gateway": {
            "endpoint": gateway_endpoint(owner, spec),
            "replicas": gateway.replicas,
            "readyReplicas": gateway.ready,
        },
    }
    if _changed(status, new_status):
        ctx.write_status(namespace, name, uid, status, new_status)
        was_invalid = cond.get_condition(old_conditions, cond.INVALID_SPEC)
        if was_invalid is not None and was_invalid.get("status") == "True":
            ctx.kube.event(body, "Normal", "SpecValid", "spec is valid again")
        for warning in spec_warnings(spec):  # valid, but not what a user may assume
            ctx.kube.event(body, "Warning", "SpecWarning", warning)
    return "ok"


@dataclass(frozen=True)
class _PoolState:
    pool: PoolSpec
    statefulset: str
    workload: cond.WorkloadState


def _pool_states(
    ctx: Context,
    spec: PipelineSpec,
    name: str,
    namespace: str,
    sizes: Mapping[str, int],
    pool_sizes: Mapping[str, Mapping[str, int]] | None,
) -> dict[str, list[_PoolState]]:
    """Per stage, each pool's StatefulSet and observed state; a named pool's workload
    is called `<stage>/<pool>` in readiness messages."""
    out: dict[str, list[_PoolState]] = {}
    for stage in STAGES:
        st = spec.stages[stage]
        split = stage_pool_sizes(st, sizes[stage], (pool_sizes or {}).get(stage))
        out[stage] = []
        for pool in st.effective_pools:
            sts = pool_name(name, st, pool)
            obj = ctx.kube.get("apps/v1", "StatefulSet", namespace, sts)
            label = f"{stage}/{pool.name}" if st.pools else stage
            state = cond.WorkloadState.from_object(label, obj, split[pool.name])
            out[stage].append(_PoolState(pool, sts, state))
    return out


def _stage_status(pools: list[_PoolState]) -> dict[str, int]:
    """A stage's replicas: the sums over its pools."""
    return {
        "replicas": sum(p.workload.replicas for p in pools),
        "readyReplicas": sum(p.workload.ready for p in pools),
        "desiredReplicas": sum(p.workload.desired for p in pools),
    }


def _pool_status(spec: PipelineSpec, stage: str, state: _PoolState) -> dict[str, Any]:
    accelerator = state.pool.accelerator or spec.autoscaling.accelerators.get(stage)
    entry: dict[str, Any] = {"name": state.pool.name}
    if accelerator:
        entry["accelerator"] = accelerator
    return entry | {
        "statefulSet": state.statefulset,
        "replicas": state.workload.replicas,
        "readyReplicas": state.workload.ready,
        "desiredReplicas": state.workload.desired,
    }


def _prune_pools(
    ctx: Context, status: Mapping[str, Any], namespace: str, uid: str, rendered: set[str]
) -> None:
    """Delete the StatefulSets of pools that left the spec (the last status lists them)."""
    for entries in (status.get("pools") or {}).values():
        for entry in entries or []:
            sts = str((entry or {}).get("statefulSet") or "")
            if sts and sts not in rendered:
                gone = Child(
                    "apps/v1",
                    "StatefulSet",
                    sts,
                    {"metadata": {"name": sts, "namespace": namespace}},
                )
                if ctx.kube.delete_owned(gone, uid):
                    log.info("%s: deleted StatefulSet %s of a removed pool", namespace, sts)


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(old.get(key) != value for key, value in new.items())


def cleanup(ctx: Context, body: Mapping[str, Any]) -> list[str]:
    """Delete the children still owned by a deleted pipeline (the GC does it in a cluster)."""
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid") or "")
    try:
        spec = parse_spec(body.get("spec"), ctx.spec_defaults)
    except SpecError:
        return []
    owner = Owner(
        name=str(meta["name"]), namespace=str(meta.get("namespace") or "default"), uid=uid
    )
    return [f"{c.kind}/{c.name}" for c in render_all(owner, spec) if ctx.kube.delete_owned(c, uid)]


def _context(memo: Any) -> Context:
    context = getattr(memo, "context", None)
    if not isinstance(context, Context):
        raise kopf.PermanentError("operator context missing: the startup handler did not run")
    return context


def build_registry(
    timer_interval: float = DEFAULT_TIMER_INTERVAL_S,
    registry: kopf.OperatorRegistry | None = None,
    autoscale_tick: float = DEFAULT_AUTOSCALE_TICK_S,
    prometheus_url: str | None = None,
    spec_defaults: SpecDefaults | None = None,
) -> kopf.OperatorRegistry:
    """Register the handlers on a fresh registry (tests use several operators per process).

    A fresh OperatorRegistry has none of the login handlers of kopf's default
    registry, so it gets kopf's own `login_via_client` (the kubernetes client's
    configuration: in-cluster service account, then the current kubeconfig
    context), exactly what `kopf run` would use. The autoscale timer ticks every
    `autoscale_tick` seconds; each pipeline's own spec.autoscaling.intervalSeconds
    decides which ticks do a round.
    """
    reg = registry if registry is not None else kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.login(registry=reg)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=reg)
    def startup(memo: Any, settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False  # our Events come from kube.py
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="disagfusion.io"
        )
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="disagfusion.io"
        )
        settings.persistence.finalizer = FINALIZER
        if getattr(memo, "context", None) is None:
            from disagfusion.operator.metrics import default_metrics

            memo.context = Context(
                kube=Kube.from_environment(),
                metrics=default_metrics(),
                prometheus_url=prometheus_url,
                spec_defaults=spec_defaults or SpecDefaults(),
            )

    def on_change(body: kopf.Body, memo: Any, **_: Any) -> None:
        reconcile(_context(memo), body)

    for register in (kopf.on.create, kopf.on.update, kopf.on.resume):
        register(*resource, registry=reg, id="reconcile")(on_change)

    @kopf.timer(
        *resource, registry=reg, interval=timer_interval, initial_delay=timer_interval, id="drift"
    )
    def drift(body: kopf.Body, memo: Any, **_: Any) -> None:
        reconcile(_context(memo), body)

    @kopf.timer(*resource, registry=reg, interval=autoscale_tick, id="autoscale")
    def autoscale_timer(body: kopf.Body, memo: Any, **_: Any) -> None:
        ctx = _context(memo)
        try:
            autoscale(ctx, body)
        except KubeError as err:  # the next tick tries again
            ctx.metrics.scaling.rounds.labels(result="error").inc()
            log.warning("%s: autoscale round failed: %s", body.get("metadata", {}).get("name"), err)

    @kopf.on.event(*resource, registry=reg, id="cleanup")
    def on_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
        if event.get("type") == "DELETED":
            ctx = _context(memo)
            meta = event["object"].get("metadata") or {}
            ctx.forget(str(meta.get("uid") or ""))
            ctx.metrics.scaling.forget(str(meta.get("namespace") or "default"), str(meta["name"]))
            removed = cleanup(ctx, event["object"])
            if removed:
                log.info("deleted children of a deleted pipeline: %s", ", ".join(removed))

    return reg
