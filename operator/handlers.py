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

kopf's own bookkeeping (progress, last-handled configuration) lives in
annotations prefixed `disagfusion.io/`.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from disagfusion.operator import conditions as cond
from disagfusion.operator.kube import Kube, KubeError
from disagfusion.operator.metrics import OperatorMetrics
from disagfusion.operator.render import (
    GROUP,
    PLURAL,
    VERSION,
    Owner,
    gateway_endpoint,
    gateway_name,
    render_all,
    stage_name,
)
from disagfusion.operator.spec import STAGES, SpecError, parse_spec

log = logging.getLogger(__name__)
DEFAULT_TIMER_INTERVAL_S = 30.0
FINALIZER = "disagfusion.io/operator"


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Context:
    kube: Kube
    metrics: OperatorMetrics


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
    meta = body.get("metadata") or {}
    name, namespace = str(meta["name"]), str(meta.get("namespace") or "default")
    generation = int(meta.get("generation") or 0)
    status: Mapping[str, Any] = body.get("status") or {}
    old_conditions = list(status.get("conditions") or [])
    try:
        spec = parse_spec(body.get("spec"))
    except SpecError as err:
        conditions = cond.apply_invalid(old_conditions, err.problems, now, generation)
        new_status = {**status, "observedGeneration": generation, "conditions": conditions}
        if _changed(status, new_status):
            ctx.kube.patch_status(namespace, name, new_status)
            ctx.kube.event(body, "Warning", "InvalidSpec", str(err))
        log.warning("%s/%s: invalid spec: %s", namespace, name, err)
        return "invalid"

    owner = Owner(name=name, namespace=namespace, uid=str(meta.get("uid") or ""))
    changes = {
        child.kind + "/" + child.name: ctx.kube.apply(child) for child in render_all(owner, spec)
    }
    written = {k: v for k, v in changes.items() if v != "unchanged"}
    if written:
        log.info(
            "%s/%s: %s", namespace, name, ", ".join(f"{v} {k}" for k, v in sorted(written.items()))
        )

    workloads = [
        cond.WorkloadState.from_object(
            stage,
            ctx.kube.get("apps/v1", "StatefulSet", namespace, stage_name(name, stage)),
            spec.stages[stage].replicas,
        )
        for stage in STAGES
    ]
    workloads.append(
        cond.WorkloadState.from_object(
            "gateway",
            ctx.kube.get("apps/v1", "Deployment", namespace, gateway_name(name)),
            spec.gateway.replicas,
        )
    )
    readiness = cond.evaluate(workloads)
    new_status = {
        "observedGeneration": generation,
        "conditions": cond.apply_readiness(old_conditions, readiness, now, generation),
        "stages": {
            w.name: {"replicas": w.replicas, "readyReplicas": w.ready, "desiredReplicas": w.desired}
            for w in workloads
            if w.name in STAGES
        },
        "gateway": {
            "endpoint": gateway_endpoint(owner, spec),
            "replicas": workloads[-1].replicas,
            "readyReplicas": workloads[-1].ready,
        },
    }
    if _changed(status, new_status):
        ctx.kube.patch_status(namespace, name, new_status)
        was_invalid = cond.get_condition(old_conditions, cond.INVALID_SPEC)
        if was_invalid is not None and was_invalid.get("status") == "True":
            ctx.kube.event(body, "Normal", "SpecValid", "spec is valid again")
    return "ok"


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(old.get(key) != value for key, value in new.items())


def cleanup(ctx: Context, body: Mapping[str, Any]) -> list[str]:
    """Delete the children still owned by a deleted pipeline (the GC does it in a cluster)."""
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid") or "")
    try:
        spec = parse_spec(body.get("spec"))
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
) -> kopf.OperatorRegistry:
    """Register the handlers on a fresh registry (tests use several operators per process)."""
    reg = registry if registry is not None else kopf.OperatorRegistry()
    resource = (GROUP, VERSION, PLURAL)

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

            memo.context = Context(kube=Kube.from_environment(), metrics=default_metrics())

    def on_change(body: kopf.Body, memo: Any, **_: Any) -> None:
        reconcile(_context(memo), body)

    for register in (kopf.on.create, kopf.on.update, kopf.on.resume):
        register(*resource, registry=reg, id="reconcile")(on_change)

    @kopf.timer(
        *resource, registry=reg, interval=timer_interval, initial_delay=timer_interval, id="drift"
    )
    def drift(body: kopf.Body, memo: Any, **_: Any) -> None:
        reconcile(_context(memo), body)

    @kopf.on.event(*resource, registry=reg, id="cleanup")
    def on_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
        if event.get("type") == "DELETED":
            removed = cleanup(_context(memo), event["object"])
            if removed:
                log.info("deleted children of a deleted pipeline: %s", ", ".join(removed))

    return reg
