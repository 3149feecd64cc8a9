"""The autoscaler round's pure plan: status patch, history, sizes to apply, Events, metrics.

No kopf, no API, no Prometheus: a Snapshot and a Decision go in, a RoundPlan
comes out (tests/operator/test_autoscale_operator.py runs the timer around it).
"""

from __future__ import annotations

from typing import Any

import pytest

from disagfusion.operator import conditions as cond
from disagfusion.operator.autoscale.plan import (
    HISTORY_KEPT,
    DecisionLabels,
    Event,
    RoundPlan,
    autoscaled_replicas,
    disabled_patch,
    metrics_problem,
    plan_round,
    rendered_sizes,
    round_due,
    stamp,
)
from disagfusion.operator.spec import STAGES, PipelineSpec, parse_spec
from disagfusion.scheduling.scaling import Decision, Snapshot, StageDecision, StageObservation

NOW = 1_800_000_000.0
WHEN = stamp(NOW)


def pipeline_spec(
    mode: str = "Active", profile: bool = True, max_denoiser: int = 4
) -> PipelineSpec:
    auto: dict[str, Any] = {"mode": mode, "staleAfterSeconds": 60}
    if profile:
        auto["profile"] = "builtin:qwen-image-h100"
    return parse_spec(
        {
            "model": {"source": "builtin:tiny-unet"},
            "stages": {"denoiser": {"replicas": 1, "maxReplicas": max_denoiser}},
            "autoscaling": auto,
        }
    )


def snapshot(age: float | None = 1.0, service_time: float | None = 0.5, **sizes: int) -> Snapshot:
    stages = {
        s: StageObservation(
            ready=sizes.get(s, 1),
            starting=0,
            desired=sizes.get(s, 1),
            service_time_s=service_time if s == "denoiser" else None,
        )
        for s in STAGES
    }
    return Snapshot(now=NOW, stages=stages, arrival_rps=2.0, metrics_age_s=age)


def decision(metrics_ok: bool = True, limited: str = "", **wanted: int) -> Decision:
    return Decision(
        stages={
            s: StageDecision(
                replicas=wanted.get(s, 1),
                accelerator="H100",
                predicted=wanted.get(s, 1) + 1,
                reason=f"{s} wants {wanted.get(s, 1)}",
                limited=limited if s == "denoiser" else "",
            )
            for s in STAGES
        },
        state=None,
        metrics_ok=metrics_ok,
    )


def plan(
    spec: PipelineSpec | None = None,
    status: dict[str, Any] | None = None,
    snap: Snapshot | None = None,
    dec: Decision | None = None,
    asked_problem: str = "",
) -> RoundPlan:
    return plan_round(
        pipeline="sd",
        namespace="ml",
        generation=3,
        spec=spec or pipeline_spec(),
        status=status or {},
        snapshot=snap or snapshot(),
        decision=dec,
        policy_name="test-policy",
        asked_problem=asked_problem,
        now=NOW,
    )


def conditions_of(p: RoundPlan) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in p.status_patch["conditions"]}


def test_active_scale_up_writes_sizes_history_event_and_metrics() -> None:
    p = plan(dec=decision(denoiser=3))
    auto = p.status_patch["autoscaling"]
    assert p.apply == auto["replicas"] == {"encoder": 1, "denoiser": 3, "decoder": 1}
    assert p.changed == {"denoiser": (1, 3)}
    assert auto["lastScaleTime"] == WHEN
    assert (auto["mode"], auto["policy"], auto["profile"]) == (
        "Active",
        "test-policy",
        "builtin:qwen-image-h100",
    )
    assert auto["stages"]["denoiser"] == {
        "currentReplicas": 1,
        "desiredReplicas": 3,
        "predictedReplicas": 4,
        "accelerator": "H100",
        "reason": "denoiser wants 3",
        "limited": "",
    }
    entry = {
        "time": WHEN,
        "stage": "denoiser",
        "from": 1,
        "to": 3,
        "applied": True,
        "reason": "denoiser wants 3",
    }
    assert p.history == auto["history"] == [entry]
    assert p.events == [Event("Normal", "Scaled", "denoiser 1 -> 3 replicas: denoiser wants 3")]
    assert p.decisions == [DecisionLabels("denoiser", "up", "load", True)]
    den = p.gauges["denoiser"]
    assert (den.current, den.desired, den.predicted) == (1, 3, 4)
    assert den.observed_service_time_s == 0.5 and den.predicted_service_time_s is not None
    assert p.gauges["encoder"].observed_service_time_s is None
    assert p.arrival_rps == 2.0 and p.metrics_ok and p.result == "ok"
    assert conditions_of(p) == {
        cond.SCALING_ACTIVE: ("True", "Scaling"),
        cond.SCALING_LIMITED: ("False", "WithinLimits"),
        cond.METRICS_AVAILABLE: ("True", "MetricsFresh"),
    }
    assert all(c["observedGeneration"] == 3 for c in p.status_patch["conditions"])


def test_the_policy_is_clamped_to_the_stage_bounds_and_a_cap_is_reported() -> None:
    p = plan(dec=decision(limited="max", denoiser=9))
    assert p.apply is not None and p.apply["denoiser"] == 4  # maxReplicas
    assert p.decisions == [DecisionLabels("denoiser", "up", "max", True)]
    assert conditions_of(p)[cond.SCALING_LIMITED] == ("True", "MaxReplicasReached")


def test_no_move_applies_nothing_and_keeps_the_last_scale_time() -> None:
    p = plan(snap=snapshot(denoiser=3), dec=decision(denoiser=3))
    assert p.apply is None and p.changed == {} and p.history == p.events == []
    assert "lastScaleTime" not in p.status_patch["autoscaling"]


def test_history_keeps_the_newest_entries() -> None:
    old = [{"time": "t", "stage": "encoder", "from": i, "to": i + 1} for i in range(HISTORY_KEPT)]
    p = plan(status={"autoscaling": {"history": old}}, dec=decision(denoiser=2))
    history = p.status_patch["autoscaling"]["history"]
    assert len(history) == HISTORY_KEPT
    assert history[0] == old[1] and history[-1]["stage"] == "denoiser"


def test_advisory_advises_once_and_owns_no_sizes() -> None:
    spec = pipeline_spec("Advisory")
    first = plan(spec, dec=decision(denoiser=3))
    auto = first.status_patch["autoscaling"]
    assert first.apply is None and auto["replicas"] is None and "lastScaleTime" not in auto
    assert first.events == [
        Event("Normal", "ScaleAdvised", "denoiser 1 -> 3 replicas: denoiser wants 3")
    ]
    assert first.decisions == [DecisionLabels("denoiser", "up", "load", False)]
    assert conditions_of(first)[cond.SCALING_ACTIVE] == ("False", "Advisory")
    # The same advice next round: no new entry, no new Event.
    again = plan(spec, status={"autoscaling": auto}, dec=decision(denoiser=3))
    assert again.changed == {"denoiser": (1, 3)}
    assert again.history == again.events == again.decisions == []
    assert again.status_patch["autoscaling"]["history"] == auto["history"]


@pytest.mark.parametrize(
    ("snap", "asked", "problem"),
    [
        (snapshot(age=None), "Prometheus query failed: HTTP 503", "HTTP 503"),
        (snapshot(age=None), "", "no samples of pipeline sd in ml"),
        (snapshot(age=90), "", "newest sample is 90s old"),
    ],
)
def test_active_holds_its_own_sizes_without_fresh_metrics(
    snap: Snapshot, asked: str, problem: str
) -> None:
    # The StatefulSet was edited to 7 meanwhile: the held size (status) is put back.
    held = {"autoscaling": {"replicas": {"encoder": 1, "denoiser": 3, "decoder": 1}}}
    live = snapshot(age=snap.metrics_age_s, denoiser=7)
    p = plan(status=held, snap=live, dec=decision(denoiser=1), asked_problem=asked)
    assert not p.metrics_ok and p.result == "no_metrics"
    assert p.apply == {"encoder": 1, "denoiser": 3, "decoder": 1}
    assert p.history[0]["reason"] == "held at the last size"
    assert p.decisions == [DecisionLabels("denoiser", "down", "hold", True)]
    metrics = next(c for c in p.status_patch["conditions"] if c["type"] == cond.METRICS_AVAILABLE)
    assert metrics["status"] == "False" and problem in metrics["message"]
    assert conditions_of(p)[cond.SCALING_ACTIVE] == ("False", "HoldingSizes")


def test_advisory_holds_the_live_sizes_without_fresh_metrics() -> None:
    p = plan(pipeline_spec("Advisory"), snap=snapshot(denoiser=2), dec=decision(False, denoiser=4))
    assert p.changed == {} and p.apply is None
    metrics = next(c for c in p.status_patch["conditions"] if c["type"] == cond.METRICS_AVAILABLE)
    assert "the policy found the metrics incomplete" in metrics["message"]


def test_without_a_profile_nothing_is_sized() -> None:
    p = plan(pipeline_spec(profile=False))
    assert p.result == "no_profile" and p.apply is None
    assert p.status_patch["autoscaling"]["stages"]["denoiser"] == {
        "currentReplicas": 1,
        "desiredReplicas": 1,
        "reason": "no profile: not sizing",
    }
    assert p.gauges["denoiser"].predicted is None
    assert p.gauges["denoiser"].predicted_service_time_s is None
    assert conditions_of(p)[cond.SCALING_ACTIVE] == ("False", "NoProfile")


def test_metrics_problem() -> None:
    assert metrics_problem("sd", "ml", snapshot(age=5), 60, "") == ""
    assert metrics_problem("sd", "ml", snapshot(age=5), 60, "refused") == "refused"
    assert "no samples" in metrics_problem("sd", "ml", snapshot(age=None), 60, "")
    assert metrics_problem("sd", "ml", snapshot(age=61), 60, "") == "newest sample is 61s old"


def test_rendered_sizes_are_the_autoscalers_only_when_active() -> None:
    saved = {"autoscaling": {"replicas": {"denoiser": 3, "vae": 2, "encoder": "x"}}}
    assert autoscaled_replicas(pipeline_spec(), saved) == {"denoiser": 3}
    assert autoscaled_replicas(pipeline_spec("Advisory"), saved) is None
    assert autoscaled_replicas(pipeline_spec(), {}) is None
    assert rendered_sizes(pipeline_spec(), saved) == {"encoder": 1, "denoiser": 3, "decoder": 1}
    assert rendered_sizes(pipeline_spec("Advisory"), saved)["denoiser"] == 1
    # Within the stage's bounds whatever the status says.
    too_big = {"autoscaling": {"replicas": {"denoiser": 40}}}
    assert rendered_sizes(pipeline_spec(), too_big)["denoiser"] == 4


def test_round_due() -> None:
    assert round_due(None, NOW, 15)
    assert not round_due(NOW - 14.9, NOW, 15)
    assert round_due(NOW - 15, NOW, 15)


def test_disabled_patch_removes_only_what_the_autoscaler_left() -> None:
    ready = cond.set_condition([], cond.READY, True, "AllReplicasReady", "ok", WHEN)
    checks = cond.scaling_checks("Active", "builtin:x", True, "", {})
    scaled = cond.apply_scaling(ready, checks, WHEN, 1)
    assert disabled_patch({"conditions": ready}) is None
    assert disabled_patch({"conditions": scaled}) == {"autoscaling": None, "conditions": ready}
    assert disabled_patch({"autoscaling": {}, "conditions": ready}) == {
        "autoscaling": None,
        "conditions": ready,
    }


def test_stamp_is_utc() -> None:
    assert stamp(0) == "1970-01-01T00:00:00Z"
