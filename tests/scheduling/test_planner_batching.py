"""Batching in the planner, the hybrid policy and `plan`: sized for the batch a load forms."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from disagfusion.cli import main
from disagfusion.scheduling.builtin_profiles import builtin_profile
from disagfusion.scheduling.capacity import batched_servers_for, servers_for
from disagfusion.scheduling.hybrid import HybridPolicy, Outlook, stage_need
from disagfusion.scheduling.planner import plan_for_gpus, plan_for_rate
from disagfusion.scheduling.profile import (
    STAGES,
    Profile,
    batch_at_rate,
    batch_factor,
    parse_profile,
    with_max_batch,
)
from disagfusion.scheduling.scaling import Knobs, Snapshot, StageObservation

# sglang PR 22183: Qwen-Image-2512 denoiser on H200 at 512², 50 steps (0.167 s/step alone).
TERM_512 = {"2": 1.10, "3": 1.12, "4": 1.44, "8": 2.55, "16": 4.99}
T1 = 0.167 * 50
TERM = tuple((int(b), f) for b, f in TERM_512.items())


def qwen_512(slo: str = "120s") -> dict[str, Any]:
    return {
        "name": "qwen-512",
        "accelerators": [{"name": "H200", "cost_per_hour": 3.5, "memory_gb": 141}],
        "default_request": {"width": 512, "height": 512, "frames": 1, "steps": 50},
        "defaults": {"gpus": 64, "slo": slo},
        "stages": {
            "encoder": {"H200": {"a": 0.26}},
            "denoiser": {"H200": {"a": T1, "batch": TERM_512}},
            "decoder": {"H200": {"a": 0.046}},
        },
    }


BATCHED = parse_profile(qwen_512())
ALONE = with_max_batch(BATCHED, 1)


# --- capacity ----------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.01, 0.3, 2.0, 40.0])
@pytest.mark.parametrize("wait", [0.5, 30.0])
def test_without_batching_the_pool_is_servers_for(rate: float, wait: float) -> None:
    want = servers_for(rate, T1, wait, 0.8)
    for term, limit in (((), 16), (TERM, 1)):
        pool = batched_servers_for(rate, T1, wait, 0.8, term, limit)
        assert (pool.servers, pool.batch, pool.seconds_per_request) == (want, 1, T1)


def test_a_low_rate_forms_no_batch() -> None:
    pool = batched_servers_for(0.05, T1, 30.0, 0.8, TERM, 16)  # 0.42 of one instance
    assert (pool.servers, pool.batch) == (servers_for(0.05, T1, 30.0, 0.8), 1)


def test_a_high_rate_needs_fewer_instances_at_the_batch_it_forms() -> None:
    rate = 5.0
    pool = batched_servers_for(rate, T1, 30.0, 0.8, TERM, 16)
    alone = servers_for(rate, T1, 30.0, 0.8)
    assert pool.batch >= 2 and pool.servers < alone / 2
    # The batch is what the rate per instance forms, not the best case (16).
    assert pool.batch == batch_at_rate(rate / pool.servers, T1, TERM, 16) < 16
    batch_s = T1 * batch_factor(TERM, pool.batch)
    assert pool.seconds_per_request == pytest.approx(batch_s / pool.batch)
    assert rate / pool.servers * batch_s <= pool.batch  # keeps up
    assert 1.5 * batch_s - T1 <= 30.0  # the delay batching adds fits the wait budget


def test_a_tight_wait_budget_keeps_requests_alone() -> None:
    # A batch makes a request wait ~half a batch and run a whole one: > 4 s here.
    pool = batched_servers_for(5.0, T1, 4.0, 0.8, TERM, 16)
    assert (pool.servers, pool.batch) == (servers_for(5.0, T1, 4.0, 0.8), 1)


def test_the_fewest_batched_pool_is_the_smallest_that_passes() -> None:
    rate, wait = 3.0, 30.0
    pool = batched_servers_for(rate, T1, wait, 0.8, TERM, 16)
    for n in range(1, pool.servers):  # every smaller pool breaks a limit
        size = batch_at_rate(rate / n, T1, TERM, 16)
        batch_s = T1 * batch_factor(TERM, size)
        headroom = 0.8 * 16 / (T1 * batch_factor(TERM, 16))
        assert (
            rate / n * batch_s > size * (1 + 1e-9)
            or rate / n > headroom
            or 1.5 * batch_s - T1 > wait
        ), n


# --- the planner ---------------------------------------------------------------------


def test_rate_plan_with_batching_needs_fewer_denoisers_at_a_high_rate() -> None:
    batched, alone = plan_for_rate(BATCHED, 4.0), plan_for_rate(ALONE, 4.0)
    d, d1 = batched.stages["denoiser"], alone.stages["denoiser"]
    assert d.batch >= 2 and d.max_batch == 16 and d1.batch == 1
    assert d.replicas < d1.replicas and batched.cost_per_hour < alone.cost_per_hour
    assert d.service_time_s == pytest.approx(T1 * batch_factor(TERM, d.batch) / d.batch)
    assert batched.throughput_rps >= 4.0 and d.throughput_rps == pytest.approx(
        d.replicas / d.service_time_s
    )
    assert batched.stages["encoder"] == alone.stages["encoder"]  # no term: unchanged


def test_rate_plan_at_a_low_rate_is_the_same_as_without_batching() -> None:
    batched, alone = plan_for_rate(BATCHED, 0.05), plan_for_rate(ALONE, 0.05)
    assert {s: p.replicas for s, p in batched.stages.items()} == {
        s: p.replicas for s, p in alone.stages.items()
    }
    assert batched.stages["denoiser"].batch == 1
    assert batched.throughput_rps == pytest.approx(alone.throughput_rps)


def test_gpu_plan_counts_a_saturated_stage_at_its_largest_batch() -> None:
    batched, alone = plan_for_gpus(BATCHED, 64), plan_for_gpus(ALONE, 64)
    assert alone.bottleneck == "denoiser"
    # Batched denoisers carry ~3.2x (the published plateau): the 0.05 s decoder binds first.
    assert batched.throughput_rps > 2.9 * alone.throughput_rps
    d = batched.stages["denoiser"]
    assert d.batch == batch_at_rate(batched.throughput_rps / d.replicas, T1, TERM, 16) > 1
    assert d.throughput_rps == pytest.approx(
        d.replicas * d.batch / (T1 * batch_factor(TERM, d.batch))
    )
    for s in STAGES:  # every stage carries the pipeline's throughput at its own batch
        assert batched.stages[s].throughput_rps >= batched.throughput_rps * (1 - 1e-9)
    heavy = parse_profile(
        {**qwen_512(), "stages": {**qwen_512()["stages"], "decoder": {"H200": {"a": 0.001}}}}
    )
    saturated = plan_for_gpus(heavy, 64)
    assert saturated.bottleneck == "denoiser" and saturated.stages["denoiser"].batch == 16


def test_builtin_qwen_serves_alone_unless_told_to_batch() -> None:
    qwen = builtin_profile("qwen-image-h100")
    assert plan_for_gpus(qwen, 64) == plan_for_gpus(with_max_batch(qwen, 1), 64)
    three = plan_for_gpus(with_max_batch(qwen, 3), 64)
    gain = three.throughput_rps / plan_for_gpus(qwen, 64).throughput_rps
    assert gain == pytest.approx(3 / 2.92)  # the published 1024² figure: ~3 %
    # At a rate, a 2-3 % gain never pays the latency: the same plan.
    assert plan_for_rate(with_max_batch(qwen, 3), 2.0).gpus == plan_for_rate(qwen, 2.0).gpus


# --- the hybrid policy ---------------------------------------------------------------


def outlook(rate: float) -> Outlook:
    return Outlook(rate, rate, 60.0, 0.9, 60.0)


def test_stage_need_batches_at_a_high_forecast_rate_only() -> None:
    plain = stage_need(0.0, T1, 1.0, 30.0, outlook(5.0))
    batched = stage_need(0.0, T1, 1.0, 30.0, outlook(5.0), TERM, 16)
    assert batched.batch >= 2 and batched.wanted < plain.wanted
    assert batched.predicted == batched_servers_for(5.0, T1, 30.0, 0.9, TERM, 16).servers
    assert f"at batch {batched.batch}" in batched.why
    low = stage_need(0.0, T1, 1.0, 30.0, outlook(0.05), TERM, 16)
    assert low == stage_need(0.0, T1, 1.0, 30.0, outlook(0.05))  # batches don't form


def _snapshot(profile: Profile, rate: float, sizes: dict[str, int]) -> Snapshot:
    """No observed service times yet: the model alone decides."""
    stages = {
        s: StageObservation(ready=n, starting=0, desired=n, queue_depth=0.0)
        for s, n in sizes.items()
    }
    return Snapshot(now=0.0, stages=stages, arrival_rps=rate)


@pytest.mark.parametrize(("rate", "fewer"), [(4.0, True), (0.05, False)])
def test_hybrid_policy_sizes_for_the_batch_the_rate_forms(rate: float, fewer: bool) -> None:
    knobs = Knobs(max_gpus=1000, scale_down_window_s=0.0, max_step_up=10_000)
    sizes = dict.fromkeys(STAGES, 1)
    policy = HybridPolicy()
    out = {}
    for name, profile in (("batched", BATCHED), ("alone", ALONE)):
        decision = policy.decide(
            _snapshot(profile, rate, sizes), policy.initial_state(), profile, knobs
        )
        out[name] = decision.replicas()["denoiser"]
    if fewer:
        assert out["batched"] < out["alone"]
    else:
        assert out["batched"] == out["alone"]


def test_hybrid_feedback_expects_the_batch_time_per_request() -> None:
    # Denoisers running at the batch the rate forms report t(B)/B per request:
    # the policy must not read that as a faster GPU and shrink further.
    policy = HybridPolicy()
    knobs = Knobs(max_gpus=1000, scale_down_window_s=0.0, max_step_up=10_000)
    first = policy.decide(
        _snapshot(BATCHED, 4.0, dict.fromkeys(STAGES, 1)), policy.initial_state(), BATCHED, knobs
    )
    n = first.replicas()["denoiser"]
    size = batch_at_rate(4.0 / n, T1, TERM, 16)
    snap = _snapshot(BATCHED, 4.0, {**first.replicas()})
    observed = T1 * batch_factor(TERM, size) / size
    stages = {
        **snap.stages,
        "denoiser": StageObservation(ready=n, starting=0, desired=n, service_time_s=observed),
    }
    second = policy.decide(
        Snapshot(now=15.0, stages=stages, arrival_rps=4.0), first.state, BATCHED, knobs
    )
    assert second.state.ratios["denoiser"] == pytest.approx(1.0)
    assert second.replicas()["denoiser"] == n


# --- the CLI -------------------------------------------------------------------------


def test_cli_plan_shows_the_batch_assumed(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "qwen-512.json"
    path.write_text(json.dumps(qwen_512()))
    assert main(["plan", "--profile", str(path), "--rate", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    denoiser = doc["stages"]["denoiser"]
    assert denoiser["batch"] >= 2 and denoiser["max_batch"] == 16
    assert "batch" not in doc["stages"]["encoder"]  # no term: batching not in play
    assert main(["plan", "--profile", str(path), "--rate", "4", "--max-batch", "1", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert "batch" not in alone["stages"]["denoiser"]
    assert alone["stages"]["denoiser"]["replicas"] > denoiser["replicas"]
    assert main(["plan", "--profile", str(path), "--rate", "4"]) == 0
    text = capsys.readouterr().out
    assert "batch" in text.splitlines()[1] and f"{denoiser['batch']}/16" in text


def test_cli_plan_rejects_a_bad_max_batch(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--profile", "builtin:qwen-image-h100", "--gpus", "64", "--max-batch", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: max batch must be an integer >= 1") and err.count("\n") == 1


def test_plan_json_has_no_batch_keys_without_batching() -> None:
    doc = plan_for_gpus(builtin_profile("qwen-image-h100"), 64).to_json()
    assert all("batch" not in s for s in doc["stages"].values())
    assert math.isfinite(doc["throughput_rps"])
