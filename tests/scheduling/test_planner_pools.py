"""Heterogeneous pools: one stage on several accelerator types (scheduling/pools*.py)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from disagfusion.scheduling.builtin_profiles import builtin_profile
from disagfusion.scheduling.planner import Plan, plan_for_gpus, plan_for_rate
from disagfusion.scheduling.pools import plan_pools_for_gpus
from disagfusion.scheduling.pools_rate import plan_pools_for_rate
from disagfusion.scheduling.profile import STAGES, Profile, parse_profile, with_max_batch

REPO = Path(__file__).resolve().parents[2]
MIXED = builtin_profile("qwen-image-h100-l40s")


def two_types(
    fast: dict[str, float],
    slow: dict[str, float],
    counts: tuple[int, int],
    prices: tuple[float, float] = (3.0, 1.0),
) -> Profile:
    """Fixed times (coefficient a) per stage on a fast type F and a slow type S."""
    return parse_profile(
        {
            "name": "two",
            "accelerators": [
                {"name": "F", "cost_per_hour": prices[0], "memory_gb": 80, "count": counts[0]},
                {"name": "S", "cost_per_hour": prices[1], "memory_gb": 48, "count": counts[1]},
            ],
            "stages": {s: {"F": {"a": fast[s]}, "S": {"a": slow[s]}} for s in STAGES},
        }
    )


def check_pools(profile: Profile, plan: Plan, budget: int | None = None) -> None:
    """Totals add up over the pools, and every type stays within its count."""
    used: dict[str, int] = {}
    for stage in plan.stages.values():
        assert stage.pools and stage.replicas == sum(p.replicas for p in stage.pools)
        assert stage.throughput_rps == pytest.approx(sum(p.throughput_rps for p in stage.pools))
        largest = max(stage.pools, key=lambda p: p.replicas)
        assert stage.accelerator == largest.accelerator
        for p in stage.pools:
            assert p.replicas >= 1
            assert p.throughput_rps == pytest.approx(p.replicas / p.service_time_s)
            used[p.accelerator] = used.get(p.accelerator, 0) + p.replicas * p.gpus_per_instance
    for acc, gpus in used.items():
        count = profile.accelerator(acc).count
        assert count is None or gpus <= count, (acc, gpus)
    assert plan.gpus == sum(used.values())
    cost = sum(g * profile.accelerator(a).cost_per_hour for a, g in used.items())
    assert plan.cost_per_hour == pytest.approx(cost)
    assert plan.throughput_rps == min(s.throughput_rps for s in plan.stages.values())
    if budget is not None:
        assert plan.gpus <= budget


def pools_of(plan: Plan, stage: str) -> dict[str, int]:
    return {p.accelerator: p.replicas for p in plan.stages[stage].pools}


# --- a GPU budget ------------------------------------------------------------------------


def test_the_mixed_builtin_uses_both_types_for_the_denoiser_at_64_gpus() -> None:
    before = plan_for_gpus(MIXED, 64)  # one type per stage: 34 GPUs, 1.26 req/s
    plan = plan_pools_for_gpus(MIXED, 64)
    check_pools(MIXED, plan, 64)
    assert plan.gpus >= 60 and plan.throughput_rps >= 1.6  # the issue's target
    assert set(pools_of(plan, "denoiser")) == {"H100", "L40S"}
    assert pools_of(plan, "denoiser")["H100"] == 32  # every H100 on the heavy stage
    assert plan.throughput_rps > before.throughput_rps * 1.3 and before.gpus == 34
    # The light stages just keep up: one fewer instance would bind.
    for s in ("encoder", "decoder"):
        stage = plan.stages[s]
        assert stage.throughput_rps >= plan.throughput_rps
        one_less = stage.throughput_rps - min(1 / p.service_time_s for p in stage.pools)
        assert one_less < plan.throughput_rps


def brute_force(profile: Profile, budget: int) -> tuple[float, float]:
    """(the most throughput, the least cost at it) over every allocation."""
    names = [a.name for a in profile.accelerators]
    counts = {a.name: a.count or budget for a in profile.accelerators}
    rates = {
        (s, a): 1 / profile.service_time(s, a, profile.default_request)
        for s in STAGES
        for a in names
    }
    per_stage = list(itertools.product(*(range(counts[a] + 1) for a in names)))
    best: tuple[float, float] = (0.0, math.inf)
    for alloc in itertools.product(per_stage, repeat=len(STAGES)):
        use = [sum(stage[i] for stage in alloc) for i in range(len(names))]
        if any(u > counts[a] for u, a in zip(use, names, strict=True)) or sum(use) > budget:
            continue
        if any(sum(stage) == 0 for stage in alloc):
            continue
        rate = min(
            sum(n * rates[s, a] for n, a in zip(stage, names, strict=True))
            for s, stage in zip(STAGES, alloc, strict=True)
        )
        cost = sum(
            u * profile.accelerator(a).cost_per_hour for u, a in zip(use, names, strict=True)
        )
        if rate > best[0] * (1 + 1e-9) or (rate >= best[0] * (1 - 1e-9) and cost < best[1]):
            best = (rate, cost)
    return best


@pytest.mark.parametrize("budget", [3, 5, 7, 9])
def test_the_budget_plan_is_the_best_allocation_and_the_cheapest_at_it(budget: int) -> None:
    profile = two_types(
        {"encoder": 1.0, "denoiser": 10.0, "decoder": 2.0},
        {"encoder": 1.5, "denoiser": 25.0, "decoder": 5.0},
        counts=(4, 4),
    )
    plan = plan_pools_for_gpus(profile, budget)
    check_pools(profile, plan, budget)
    rate, cost = brute_force(profile, budget)
    assert plan.throughput_rps == pytest.approx(rate, rel=1e-9)
    assert plan.cost_per_hour == pytest.approx(cost)


def test_equal_throughput_goes_to_the_cheaper_type() -> None:
    same = {"encoder": 1.0, "denoiser": 8.0, "decoder": 1.0}
    profile = two_types(same, same, counts=(10, 10), prices=(3.0, 1.0))
    plan = plan_pools_for_gpus(profile, 10)  # the budget binds, not the counts
    check_pools(profile, plan, 10)
    assert {p.accelerator for s in plan.stages.values() for p in s.pools} == {"S"}
    assert plan.cost_per_hour == pytest.approx(10 * 1.0)


def test_a_budget_below_one_instance_per_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="smallest pipeline needs 3 GPUs"):
        plan_pools_for_gpus(MIXED, 2)


def test_batching_pools_run_within_their_limit() -> None:
    batched = with_max_batch(MIXED, 3)
    plan = plan_pools_for_gpus(batched, 64)
    check_pools(batched, plan, 64)
    assert plan.throughput_rps >= plan_pools_for_gpus(MIXED, 64).throughput_rps
    for p in plan.stages["denoiser"].pools:
        assert 1 <= p.batch <= p.max_batch == 3


# --- one accelerator type: the planner's plan, unchanged ---------------------------------


@pytest.mark.parametrize(
    ("name", "gpus", "replicas"),
    [("qwen-image-h100", 64, (1, 62, 1)), ("wan2.1-14b-t2v-h100", 96, None)],
)
def test_a_single_type_profile_plans_as_before(
    name: str, gpus: int, replicas: tuple[int, int, int] | None
) -> None:
    profile = builtin_profile(name)
    plan = plan_pools_for_gpus(profile, gpus)
    assert plan == plan_for_gpus(profile, gpus)
    assert all(not s.pools for s in plan.stages.values())
    assert all("pools" not in s for s in plan.to_json()["stages"].values())
    if replicas is not None:
        assert tuple(plan.stages[s].replicas for s in STAGES) == replicas
    rate = plan_pools_for_rate(profile, 1.0)
    assert rate == plan_for_rate(profile, 1.0)


# --- a request rate ----------------------------------------------------------------------


def test_a_loose_slo_carries_the_rate_on_a_cheaper_mix() -> None:
    single = plan_for_rate(MIXED, 1.0, slo="120s")  # the denoiser all on H100
    plan = plan_pools_for_rate(MIXED, 1.0, slo="120s")
    check_pools(MIXED, plan)
    assert set(pools_of(plan, "denoiser")) == {"H100", "L40S"}
    assert plan.cost_per_hour < single.cost_per_hour
    for stage in plan.stages.values():  # every stage under the utilization target
        assert 0.8 * stage.throughput_rps * (1 + 1e-9) >= 1.0


def test_a_pool_too_slow_for_the_slo_is_not_used() -> None:
    # An L40S denoiser takes 68 s: with the 60 s default SLO it cannot serve a request.
    assert MIXED.service_time("denoiser", "L40S", MIXED.default_request) > 60
    plan = plan_pools_for_rate(MIXED, 1.0)
    check_pools(MIXED, plan)
    assert set(pools_of(plan, "denoiser")) == {"H100"}
    assert plan.cost_per_hour <= plan_for_rate(MIXED, 1.0).cost_per_hour
    with pytest.raises(ValueError, match="more GPUs than the pool has"):
        plan_pools_for_rate(MIXED, 1.5)  # 32 H100 denoisers carry ~1 req/s at 80 %


def test_a_rate_that_needs_the_slow_pool_uses_it_when_the_slo_allows() -> None:
    with pytest.raises(ValueError, match="cannot carry"):
        plan_for_rate(MIXED, 1.2, slo="120s")  # one type per stage: too few H100
    plan = plan_pools_for_rate(MIXED, 1.2, slo="120s")
    check_pools(MIXED, plan)
    assert plan.throughput_rps * 0.8 >= 1.2 * (1 - 1e-9)


def test_a_rate_plan_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="positive"):
        plan_pools_for_rate(MIXED, 0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        plan_pools_for_rate(MIXED, 1.0, target_utilization=1.5)
    with pytest.raises(ValueError, match="no room for queueing"):
        plan_pools_for_rate(MIXED, 1.0, slo="10s")


# --- the CLI -----------------------------------------------------------------------------


def run_plan(*args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "disagfusion", "plan", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def test_cli_plan_json_has_pools_per_stage() -> None:
    doc = json.loads(
        run_plan("--profile", "builtin:qwen-image-h100-l40s", "--gpus", "64", "--json")
    )
    assert set(doc) == {
        "stages",
        "throughput_rps",
        "gpus",
        "cost_per_hour",
        "currency",
        "bottleneck",
    }
    assert doc["gpus"] >= 60 and doc["throughput_rps"] >= 1.6
    for stage in doc["stages"].values():
        assert {"replicas", "accelerator", "gpus_per_instance", "service_time_s"} <= set(stage)
        for pool in stage["pools"]:
            assert set(pool) == {"accelerator", "replicas", "gpus_per_instance", "throughput_rps"}
        assert stage["replicas"] == sum(p["replicas"] for p in stage["pools"])
    denoiser = {p["accelerator"]: p["replicas"] for p in doc["stages"]["denoiser"]["pools"]}
    assert denoiser["H100"] == 32 and denoiser["L40S"] >= 1
    assert doc["stages"]["denoiser"]["accelerator"] == "H100"  # the largest pool


def test_cli_plan_table_shows_the_pools() -> None:
    out = run_plan("--profile", "builtin:qwen-image-h100-l40s", "--gpus", "64")
    (row,) = [line for line in out.splitlines() if line.startswith("denoiser")]
    assert " 61  32 H100 + 29 L40S " in row
