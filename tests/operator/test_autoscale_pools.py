"""The autoscaler's per-pool sizes: from a decision to status, and back into the render."""

from __future__ import annotations

from typing import Any

from disagfusion.operator.autoscale.plan import autoscaled_pools, pool_targets
from disagfusion.operator.autoscale.timer import declared_types, default_policy, pool_maxima
from disagfusion.operator.children import render_all
from disagfusion.operator.render import stage_pool_sizes
from disagfusion.operator.spec import parse_spec
from disagfusion.scheduling.builtin_profiles import builtin_profile
from disagfusion.scheduling.profile import with_stage_types
from disagfusion.scheduling.scaling import Decision, StageDecision
from tests.operator.test_render_pools import CPU, H100, OWNER, pooled, spec, statefulsets

GPU = {**H100, "name": "gpu", "accelerator": "L40S", "minReplicas": 0, "maxReplicas": 5}


def active(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "autoscaling": {"mode": "Active", "profile": "builtin:qwen-image-h100-l40s"}}


def decision(**denoiser: int) -> Decision:
    stages = {
        s: StageDecision(replicas=1, accelerator="H100", predicted=1, reason="")
        for s in ("encoder", "decoder")
    }
    stages["denoiser"] = StageDecision(
        replicas=sum(denoiser.values()),
        accelerator="H100",
        predicted=0,
        reason="",
        pools=tuple(denoiser.items()),
    )
    return Decision(stages=stages, state=None)


def test_a_decision_by_accelerator_becomes_sizes_by_pool_within_each_pools_bounds() -> None:
    parsed = parse_spec(active(pooled(H100, GPU)))
    assert pool_targets(parsed, decision(H100=9, L40S=2)) == {
        "denoiser": {"h100": 3, "gpu": 2}  # h100's maxReplicas is 3
    }
    assert pool_targets(parsed, decision(L40S=4)) == {"denoiser": {"h100": 1, "gpu": 4}}
    one = Decision(
        stages={s: StageDecision(1, "H100", 1, "") for s in ("encoder", "denoiser", "decoder")},
        state=None,
    )
    assert pool_targets(parsed, one) == {}  # sized as a whole: split in list order


def test_saved_pool_sizes_apply_only_while_they_name_every_pool() -> None:
    parsed = parse_spec(active(pooled(H100, GPU)))
    saved = {"autoscaling": {"pools": {"denoiser": {"h100": 1, "gpu": 4}}}}
    assert autoscaled_pools(parsed, saved) == {"denoiser": {"h100": 1, "gpu": 4}}
    renamed = {"autoscaling": {"pools": {"denoiser": {"h100": 1, "old": 4}}}}
    assert autoscaled_pools(parsed, renamed) is None
    advisory = parse_spec({**pooled(H100, GPU), "autoscaling": {"mode": "Advisory"}})
    assert autoscaled_pools(advisory, saved) is None


def test_the_render_takes_per_pool_sizes_and_clamps_them() -> None:
    parsed = parse_spec(pooled(H100, CPU))
    sts = statefulsets(render_all(OWNER, parsed, None, {"denoiser": {"h100": 1, "cpu": 9}}))
    assert sts["sd-denoiser-h100"]["spec"]["replicas"] == 1
    assert sts["sd-denoiser-cpu"]["spec"]["replicas"] == 2  # cpu's maxReplicas
    stage = parsed.stages["denoiser"]
    assert stage_pool_sizes(stage, 4, None) == {"h100": 3, "cpu": 1}  # list order
    assert stage_pool_sizes(stage, 4, {"h100": 1}) == {"h100": 3, "cpu": 1}  # partial: ignored


def test_the_policy_plans_only_the_pools_a_pipeline_declares() -> None:
    parsed = parse_spec(active(pooled(H100, GPU)))
    assert default_policy(parsed).name == "hybrid-pools"
    assert default_policy(parse_spec(active(spec()))).name == "hybrid"
    types = declared_types(parsed)
    assert types["denoiser"] == ["H100", "L40S"]
    profile = with_stage_types(builtin_profile("qwen-image-h100-l40s"), {"denoiser": ["L40S"]})
    assert profile.options("denoiser") == ("L40S",)
    assert profile.options("encoder") == ("H100", "L40S")
    assert pool_maxima(parsed) == {"denoiser": {"H100": 3, "L40S": 5}}
