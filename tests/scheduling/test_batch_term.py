"""The profile's batch term: factors, the batch a load forms, parsing, builtin terms."""

from __future__ import annotations

import json
from typing import Any

import pytest

from disagfusion.scheduling.builtin_profiles import BUILTIN_PROFILES, builtin_profile
from disagfusion.scheduling.profile import (
    STAGES,
    ProfileError,
    RequestShape,
    StageCost,
    batch_at_rate,
    batch_capacity,
    batch_factor,
    batched_rate,
    parse_profile,
    profile_to_dict,
    with_max_batch,
)
from disagfusion.worker.local.profiler import fit_batch_term, parse_batch_sizes

TERM = ((2, 1.1), (4, 1.6))


def profile_with(denoiser: dict[str, Any]) -> dict[str, Any]:
    return {
        "accelerators": [{"name": "G"}],
        "stages": {
            "encoder": {"G": {"a": 0.1}},
            "denoiser": {"G": {"a": 2.0, **denoiser}},
            "decoder": {"G": {"a": 0.1}},
        },
    }


# --- factors --------------------------------------------------------------------


def test_batch_factor_interpolates_between_the_measured_sizes() -> None:
    assert batch_factor(TERM, 1) == 1.0
    assert batch_factor(TERM, 2) == pytest.approx(1.1)
    assert batch_factor(TERM, 3) == pytest.approx(1.35)
    assert batch_factor(TERM, 4) == pytest.approx(1.6)


def test_past_the_last_measured_size_the_throughput_stays_flat() -> None:
    assert batch_factor(TERM, 8) == pytest.approx(3.2)  # 4/1.6 req per t(1), as at B=4
    assert batched_rate(2.0, TERM, 8) == pytest.approx(batched_rate(2.0, TERM, 4))


def test_no_term_means_no_gain() -> None:
    assert batch_factor((), 5) == 5.0
    assert batched_rate(2.0, (), 5) == pytest.approx(0.5)
    cost = StageCost(a=2.0)
    assert cost.batch_seconds(RequestShape(), 3) == pytest.approx(6.0)
    assert not cost.batching and not StageCost(a=1, max_batch=4).batching


def test_batch_capacity_is_the_best_batch_up_to_the_limit() -> None:
    assert batch_capacity(2.0, TERM, 1) == (0.5, 1)
    rate, size = batch_capacity(2.0, TERM, 8)
    assert size == 4 and rate == pytest.approx(4 / (2.0 * 1.6))  # 8 ties with 4: the smaller


# --- the batch a load forms -------------------------------------------------------


def test_a_light_load_never_forms_a_batch() -> None:
    assert batch_at_rate(0.0, 2.0, TERM, 8) == 1
    assert batch_at_rate(0.4, 2.0, TERM, 8) == 1  # 0.8 of one instance
    assert batch_at_rate(0.5, 2.0, TERM, 8) == 1  # exactly full still keeps up alone


def test_a_heavier_load_forms_the_smallest_batch_that_keeps_up() -> None:
    assert batch_at_rate(0.6, 2.0, TERM, 8) == 2  # 0.6 x 2.2 s = 1.32 <= 2
    assert batch_at_rate(1.0, 2.0, TERM, 8) == 3  # B=2: 2.2 > 2; B=3: 2.7 <= 3
    assert batch_at_rate(1.0, 2.0, TERM, 2) == 2  # overloaded: the limit


def test_overload_runs_at_the_limit_and_max_batch_1_never_batches() -> None:
    assert batch_at_rate(100.0, 2.0, TERM, 8) == 8
    assert batch_at_rate(100.0, 2.0, TERM, 1) == 1


# --- the file format --------------------------------------------------------------


def test_max_batch_defaults_to_the_largest_measured_size() -> None:
    cost = parse_profile(profile_with({"batch": {"4": 1.6, "2": 1.1}})).stages["denoiser"]["G"]
    assert cost.batch == TERM and cost.max_batch == 4 and cost.batching
    plain = parse_profile(profile_with({})).stages["denoiser"]["G"]
    assert plain.batch == () and plain.max_batch == 1


@pytest.mark.parametrize("extra", [{}, {"max_batch": 1}, {"max_batch": 16}, {"max_batch": 4}])
def test_batch_fields_round_trip(extra: dict[str, Any]) -> None:
    profile = parse_profile(profile_with({"batch": {"2": 1.1, "4": 1.6}, **extra}))
    data = json.loads(json.dumps(profile_to_dict(profile)))
    assert parse_profile(data) == profile
    denoiser = data["stages"]["denoiser"]["G"]
    assert denoiser["batch"] == {"2": 1.1, "4": 1.6}
    assert denoiser.get("max_batch", 4) == extra.get("max_batch", 4)
    assert "batch" not in data["stages"]["encoder"]["G"]  # no term, none written


@pytest.mark.parametrize(
    ("denoiser", "message"),
    [
        ({"batch": {"2.5": 1.2}}, "stages.denoiser.G.batch.2.5: a batch size must be an integer"),
        ({"batch": {"1": 1.0}}, "a batch size must be an integer >= 2"),
        ({"batch": {"x": 1.0}}, "a batch size must be an integer >= 2"),
        ({"batch": {"2": 2.5}}, "stages.denoiser.G.batch.2: a factor must be in 1..2, got 2.5"),
        ({"batch": {"2": 0.9}}, "a factor must be in 1..2"),
        ({"batch": {"2": "fast"}}, "stages.denoiser.G.batch.2: must be a number"),
        ({"batch": {"2": 1.5, "4": 1.2}}, "the factor at 4 (1.2) is below the one at 2 (1.5)"),
        ({"batch": [1.1]}, "must map batch sizes to time factors"),
        ({"max_batch": 0}, "stages.denoiser.G.max_batch: must be an integer >= 1, got 0"),
        ({"max_batch": 2.5}, "max_batch: must be an integer >= 1"),
        ({"batches": {}}, "unknown field(s) batches"),
    ],
)
def test_bad_batch_fields_are_named(denoiser: dict[str, Any], message: str) -> None:
    with pytest.raises(ProfileError) as err:
        parse_profile(profile_with(denoiser))
    assert any(message in p for p in err.value.problems), err.value.problems


def test_with_max_batch_sets_every_stages_limit() -> None:
    profile = parse_profile(profile_with({"batch": {"2": 1.1, "4": 1.6}}))
    off = with_max_batch(profile, 1)
    assert all(c.max_batch == 1 for per in off.stages.values() for c in per.values())
    assert with_max_batch(profile, 8).stages["denoiser"]["G"].max_batch == 8
    assert with_max_batch(profile, 8).stages["denoiser"]["G"].batch == TERM
    with pytest.raises(ValueError, match="max batch must be an integer >= 1, got 0"):
        with_max_batch(profile, 0)


# --- builtin profiles -------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILTIN_PROFILES))
def test_builtin_batch_terms_are_valid_and_only_where_published(name: str) -> None:
    profile = builtin_profile(name)
    for stage in STAGES:
        for acc, cost in profile.stages[stage].items():
            published = name.startswith("qwen-image") and stage == "denoiser"
            assert bool(cost.batch) == published, (stage, acc)
            if published:  # sglang PR 22183, 1024² on H200 (the profiles are 1328²)
                assert cost.batch == ((2, 1.95), (3, 2.92))
                assert cost.max_batch == 1  # compute-bound: served one at a time


def test_builtin_batch_terms_survive_show(capsys: pytest.CaptureFixture[str]) -> None:
    from disagfusion.cli import main

    assert main(["profile", "--show", "builtin:qwen-image-h100-l40s", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    for acc in ("H100", "L40S"):
        denoiser = shown["stages"]["denoiser"][acc]
        assert denoiser["batch"] == {"2": 1.95, "3": 2.92} and denoiser["max_batch"] == 1


# --- the profiler's fit -----------------------------------------------------------


def test_fit_batch_term_divides_by_batch_1() -> None:
    assert fit_batch_term({1: 0.1, 2: 0.13, 4: 0.22, 8: 0.36}) == {
        "2": 1.3,
        "4": 2.2,
        "8": 3.6,
    }


def test_fit_batch_term_clamps_noise_to_1_to_b_and_never_falls() -> None:
    term = fit_batch_term({1: 0.1, 2: 0.09, 4: 0.5, 8: 0.3})
    assert term == {"2": 1.0, "4": 4.0, "8": 4.0}  # faster than alone: 1; slower than B: B
    assert fit_batch_term({1: 0.1}) == {} and fit_batch_term({1: 0.0, 2: 0.1}) == {}
    parse_profile(profile_with({"batch": term}))  # what it writes parses


def test_parse_batch_sizes() -> None:
    assert parse_batch_sizes("2, 8,4") == (1, 2, 4, 8)
    assert parse_batch_sizes("1") == (1,)
    with pytest.raises(ValueError, match="integers like 1,2,4,8"):
        parse_batch_sizes("2,x")
    with pytest.raises(ValueError, match=">= 1"):
        parse_batch_sizes("0,2")
