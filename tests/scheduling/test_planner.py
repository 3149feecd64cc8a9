"""The static planner: GPU-budget and rate plans, the CLI (the allocator: test_budget.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from disagfusion.cli import main
from disagfusion.cli.plan import load_profile, plain_number, round_floats
from disagfusion.scheduling.builtin_profiles import builtin_profile
from disagfusion.scheduling.planner import (
    Plan,
    mean_service_times,
    plan_for_gpus,
    plan_for_rate,
)
from disagfusion.scheduling.profile import STAGES, Profile, RequestShape, parse_profile

# The published balance rule as a shipped profile (docs/calibration.md).
BALANCE_RULE = Path(__file__).resolve().parents[2] / "examples/profiles/balance-rule.yaml"


def simple_profile(
    encoder: float = 0.4,
    denoiser: float = 15.0,
    decoder: float = 0.4e-4,
    price: float = 2.0,
    denoiser_gb: float = 0.0,
) -> dict[str, Any]:
    """Fixed per-request times (coefficient a only), one accelerator type."""
    return {
        "name": "fixed",
        "accelerators": [{"name": "G", "cost_per_hour": price, "memory_gb": 80}],
        "stages": {
            "encoder": {"G": {"a": encoder}},
            "denoiser": {"G": {"a": denoiser, "memory_gb": denoiser_gb}},
            "decoder": {"G": {"a": decoder}},
        },
    }


def check_cost(profile: Profile, plan: Plan) -> None:
    gpus = sum(p.replicas * p.gpus_per_instance for p in plan.stages.values())
    cost = sum(
        p.replicas * p.gpus_per_instance * profile.accelerator(p.accelerator).cost_per_hour
        for p in plan.stages.values()
    )
    assert plan.gpus == gpus
    assert plan.cost_per_hour == pytest.approx(cost)
    slowest = min(p.replicas / p.service_time_s for p in plan.stages.values())
    assert plan.throughput_rps == pytest.approx(slowest, rel=1e-9)


# --- plan_for_gpus -------------------------------------------------------------


def test_the_shipped_balance_rule_profile_is_37_5_to_1() -> None:
    profile = load_profile(str(BALANCE_RULE))
    times = {s: profile.service_time(s, "gpu", profile.default_request) for s in STAGES}
    assert times["denoiser"] / times["encoder"] == pytest.approx(37.5)
    assert times["decoder"] < times["encoder"] / 1000  # negligible
    assert profile.default_gpus == 800
    assert "docs/calibration.md" in profile.source


def test_plan_for_gpus_balance_rule_800_gpus() -> None:
    profile = load_profile(str(BALANCE_RULE))  # t_e 0.4 s, t_d 15 s: 37.5x
    plan = plan_for_gpus(profile, 800)
    assert plan.stages["encoder"].replicas == 21
    assert plan.stages["denoiser"].replicas == 778
    assert plan.stages["decoder"].replicas == 1
    assert plan.bottleneck == "denoiser"
    assert plan.throughput_rps == pytest.approx(778 / 15.0)
    assert plan.throughput_rps == pytest.approx(51.9, abs=0.1)  # the published figure
    check_cost(profile, plan)
    assert plan.gpus == 800 and plan.cost_per_hour == pytest.approx(1600.0)


def test_plan_for_gpus_heterogeneous_puts_the_denoiser_on_the_fast_card() -> None:
    profile = builtin_profile("qwen-image-h100-l40s")
    plan = plan_for_gpus(profile, profile.default_gpus or 0)
    assert plan.stages["denoiser"].accelerator == "H100"
    assert plan.stages["encoder"].accelerator == "L40S"
    assert plan.stages["decoder"].accelerator == "L40S"
    assert plan.stages["denoiser"].replicas == 32  # every H100 the pool has
    assert plan.stages["encoder"].replicas + plan.stages["decoder"].replicas <= 32
    check_cost(profile, plan)
    # Idle light instances are not bought: each light stage just keeps up.
    for s in ("encoder", "decoder"):
        assert plan.stages[s].throughput_rps >= plan.throughput_rps
        assert (plan.stages[s].replicas - 1) / plan.stages[s].service_time_s < plan.throughput_rps


def test_plan_for_gpus_counts_gpus_per_instance() -> None:
    profile = parse_profile(simple_profile(denoiser_gb=100))  # 2 GPUs per denoiser
    plan = plan_for_gpus(profile, 40)
    assert plan.stages["denoiser"].gpus_per_instance == 2
    assert plan.gpus <= 40
    check_cost(profile, plan)
    with pytest.raises(ValueError, match="needs 4 GPUs"):
        plan_for_gpus(profile, 3)


def test_plan_for_gpus_rejects_a_budget_below_one_instance_per_stage() -> None:
    with pytest.raises(ValueError, match="cannot hold one instance"):
        plan_for_gpus(builtin_profile("qwen-image-h100"), 2)


def test_plan_for_gpus_uses_the_mix_mean() -> None:
    profile = builtin_profile("qwen-image-h100")
    small = RequestShape(512, 512, 1, 20)
    mix = ((profile.default_request, 0.25), (small, 0.75))
    plan = plan_for_gpus(profile, 64, mix)
    expected = 0.25 * profile.service_time("denoiser", "H100", profile.default_request)
    expected += 0.75 * profile.service_time("denoiser", "H100", small)
    assert plan.stages["denoiser"].service_time_s == pytest.approx(expected)
    assert plan.throughput_rps > plan_for_gpus(profile, 64).throughput_rps


def test_plan_json_shape() -> None:
    doc = plan_for_gpus(builtin_profile("qwen-image-h100"), 64).to_json()
    assert set(doc) == {"stages", "throughput_rps", "gpus", "cost_per_hour", "bottleneck"}
    assert list(doc["stages"]) == list(STAGES)
    for stage in doc["stages"].values():
        assert isinstance(stage["replicas"], int) and stage["accelerator"] == "H100"
    assert doc["gpus"] == 64 and doc["cost_per_hour"] == pytest.approx(160.0)
    json.dumps(doc, allow_nan=False)


# --- plan_for_rate -------------------------------------------------------------


def test_plan_for_rate_scales_about_linearly() -> None:
    profile = builtin_profile("qwen-image-h100")
    small, large = plan_for_rate(profile, 1.0), plan_for_rate(profile, 10.0)
    ratio = large.stages["denoiser"].replicas / small.stages["denoiser"].replicas
    assert 8 <= ratio <= 11  # big pools run closer to the cap than small ones
    for plan, rate in ((small, 1.0), (large, 10.0)):
        check_cost(profile, plan)
        for s in STAGES:  # each stage under the utilization target
            p = plan.stages[s]
            assert rate * p.service_time_s / p.replicas <= 0.8 + 1e-9


def test_plan_for_rate_tighter_slo_needs_more_instances() -> None:
    profile = builtin_profile("qwen-image-h100")
    # A high utilization cap, so the wait budget decides.
    loose = plan_for_rate(profile, 2.0, slo="3x", target_utilization=0.99)
    tight = plan_for_rate(profile, 2.0, slo="1.01x", target_utilization=0.99)
    assert tight.stages["denoiser"].replicas > loose.stages["denoiser"].replicas
    with pytest.raises(ValueError, match="no room for queueing"):
        plan_for_rate(profile, 2.0, slo="10s")  # an idle pipeline takes ~26 s


def test_plan_for_rate_picks_the_cheapest_assignment_within_counts() -> None:
    profile = builtin_profile("qwen-image-h100-l40s")
    plan = plan_for_rate(profile, 0.5)
    check_cost(profile, plan)
    assert plan.stages["encoder"].accelerator == "L40S"  # cheaper per request
    assert plan.stages["denoiser"].accelerator == "H100"
    h100 = sum(p.replicas for p in plan.stages.values() if p.accelerator == "H100")
    assert h100 <= 32
    with pytest.raises(ValueError, match="more GPUs than the pool has"):
        plan_for_rate(profile, 5.0)


def test_mean_service_times_weights_the_mix() -> None:
    profile = builtin_profile("qwen-image-h100")
    a, b = RequestShape(1024, 1024, 1, 10), RequestShape(512, 512, 1, 50)
    times = mean_service_times(profile, dict.fromkeys(STAGES, "H100"), ((a, 3.0), (b, 1.0)))
    want = (3 * profile.service_time("decoder", "H100", a)) / 4
    want += profile.service_time("decoder", "H100", b) / 4
    assert times["decoder"] == pytest.approx(want)


# --- the CLI -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_cli_plan_json_balance_rule_from_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    path = BALANCE_RULE
    if suffix == ".json":  # the same profile as JSON
        path = tmp_path / "balance-rule.json"
        path.write_text(json.dumps(yaml.safe_load(BALANCE_RULE.read_text())))
    assert main(["plan", "--profile", str(path), "--gpus", "800", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["stages"]["encoder"] == {
        "replicas": 21,
        "accelerator": "gpu",
        "gpus_per_instance": 1,
        "service_time_s": 0.4,
        "throughput_rps": 52.5,
    }
    assert doc["stages"]["denoiser"]["replicas"] == 778
    assert doc["bottleneck"] == "denoiser" and doc["gpus"] == 800
    assert doc["throughput_rps"] == 51.867  # 778 / 15 to 5 significant digits
    assert (doc["cost_per_hour"], doc["currency"]) == (1600.0, "USD")


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [f for v in value for f in _floats(v)] if isinstance(value, list) else []


def test_cli_plan_json_has_no_float_noise(capsys: pytest.CaptureFixture[str]) -> None:
    # The builtin coefficients are rounded: unrounded, the times print as 25.299998, 0.309999.
    assert main(["plan", "--profile", "builtin:qwen-image-h100", "--gpus", "64", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    stages = doc["stages"]
    assert stages["denoiser"]["service_time_s"] == 25.3
    assert stages["decoder"]["service_time_s"] == 0.31
    assert stages["denoiser"]["throughput_rps"] == 2.4506
    for value in _floats(doc):
        assert len(repr(value).lstrip("0.").replace(".", "").rstrip("0")) <= 5, value
    assert (doc["cost_per_hour"], doc["currency"]) == (160.0, "USD")


def test_round_floats_keeps_money_to_the_cent() -> None:
    doc = {"a": 25.299998, "n": [0.3099988, 7, True], "cost_per_hour": 2678125.25, "s": "x"}
    assert round_floats(doc) == {
        "a": 25.3,
        "n": [0.31, 7, True],
        "cost_per_hour": 2678125.25,
        "s": "x",
    }
    assert round_floats(math.inf) == math.inf


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (51.866667, "51.87"),
        (52.5, "52.50"),
        (25000.0, "25000"),
        (38655.4, "38655"),
        (0.0004, "0.0004000"),
    ],
)
def test_plain_number_has_no_exponent(value: float, text: str) -> None:
    assert plain_number(value) == text


def test_cli_plan_human_table_and_rate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--profile", "builtin:qwen-image-h100-l40s"]) == 0  # default budget
    out = capsys.readouterr().out
    assert "64 GPUs" in out and "bottleneck denoiser" in out
    assert "cost $" in out and "/h" in out  # in USD, the profiles' currency
    assert [line.split()[:3] for line in out.splitlines()[2:5]] == [
        ["encoder", "1", "L40S"],
        ["denoiser", "61", "32"],  # 32 H100 + 29 L40S: both pools (issue #15)
        ["decoder", "2", "L40S"],
    ]
    assert "61  32 H100 + 29 L40S" in out
    assert main(["plan", "--profile", "builtin:qwen-image-h100", "--rate", "1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["throughput_rps"] >= 1 / 0.8


def test_cli_plan_uses_the_trace_mix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    rows = [{"t": i, "width": 512, "height": 512, "steps": 20} for i in range(3)] + [{"t": 3}]
    trace.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["plan", "--profile", "builtin:qwen-image-h100", "--gpus", "64", "--json"]
    assert main([*args, "--trace", str(trace)]) == 0
    doc = json.loads(capsys.readouterr().out)
    profile = builtin_profile("qwen-image-h100")
    mix = ((RequestShape(512, 512, 1, 20), 0.75), (profile.default_request, 0.25))
    want = mean_service_times(profile, dict.fromkeys(STAGES, "H100"), mix)["denoiser"]
    assert doc["stages"]["denoiser"]["service_time_s"] == pytest.approx(want, rel=1e-4)


def _bad_profile(tmp_path: Path) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"accelerators": [{"name": "G"}], "stages": {"encoder": {}}}))
    return str(path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "missing.yaml", "--gpus", "8"], "cannot read missing.yaml"),
        (["--profile", "BAD", "--gpus", "8"], "stages.denoiser: required"),
        (["--profile", "UNPARSABLE", "--gpus", "8"], "not valid YAML"),
        (["--profile", "builtin:nope", "--gpus", "8"], "unknown profile builtin:nope"),
        (["--profile", "builtin:qwen-image-h100", "--gpus", "2"], "at least 3"),
        (["--profile", "builtin:qwen-image-h100", "--gpus", "-1"], "at least 3"),
        (["--profile", "builtin:qwen-image-h100", "--gpus", "100000000"], "at most 1,000,000"),
        (["--profile", "builtin:qwen-image-h100", "--rate", "10000"], "more than 100,000"),
        (["--profile", "builtin:qwen-image-h100", "--rate", "-1"], "positive"),
        (["--profile", "builtin:qwen-image-h100", "--rate", "1", "--slo", "fast"], "SLO"),
        (
            ["--profile", "builtin:qwen-image-h100", "--rate", "1", "--target-utilization", "0"],
            "(0, 1]",
        ),
        (["--profile", "builtin:qwen-image-h100", "--gpus", "8", "--trace", "no.jsonl"], "trace"),
        (["--profile", "builtin:qwen-image-h100", "--trace", "builtin:nope"], "unknown trace"),
    ],
)
def test_cli_plan_bad_input_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    unparsable = tmp_path / "unparsable.yaml"
    unparsable.write_text("a: [1,\nb: {")
    files = {"BAD": _bad_profile(tmp_path), "UNPARSABLE": str(unparsable)}
    assert main(["plan", *[files.get(a, a) for a in args]]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert captured.err.count("\n") == 1, captured.err  # one line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "-1"], "the following arguments are required: --profile"),
        (["--profile", "builtin:qwen-image-h100", "--gpus", "many"], "invalid int value"),
        (["--profile", "builtin:qwen-image-h100", "--gpus", "4", "--rate", "1"], "not allowed"),
    ],
)
def test_cli_plan_usage_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["plan", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err  # no usage block before it
    assert err.startswith("disagfusion plan: error: ") and "--help" in err
