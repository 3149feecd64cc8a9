"""The one GPU-budget allocator and the priorities its callers give it."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from disagfusion.scheduling.budget import (
    gpus_by_accelerator,
    grow,
    max_min,
    most_starved_first,
    within_counts,
)
from disagfusion.scheduling.stages import STAGES

ONE_TYPE = {s: "G" for s in STAGES}
UNIT = {s: 1 for s in STAGES}


# --- max_min: the most pipeline throughput ------------------------------------------


def test_max_min_reproduces_the_published_balance_rule() -> None:
    # t_d / t_e = 37.5, negligible decoder, 800 GPUs: E ≈ 21, D ≈ 779 (docs/calibration.md).
    rates = {"encoder": 1.0, "denoiser": 1 / 37.5, "decoder": 1e4}
    n = max_min(rates, UNIT, ONE_TYPE, 800, UNIT)
    assert n == {"encoder": 21, "denoiser": 778, "decoder": 1}
    assert n["encoder"] == pytest.approx(800 / (1 + 37.5), abs=1)


def test_max_min_is_optimal_for_unit_instances() -> None:
    rng = random.Random(7)
    for _ in range(150):
        rates = {s: rng.choice([0.5, 1.0, 2.0, rng.uniform(0.01, 5)]) for s in STAGES}
        budget = rng.randint(3, 14)
        n = max_min(rates, UNIT, ONE_TYPE, budget, UNIT)
        assert sum(n.values()) == budget  # all of it is spent
        best = max(
            min(c[i] * rates[s] for i, s in enumerate(STAGES))
            for c in itertools.product(range(1, budget + 1), repeat=3)
            if sum(c) == budget
        )
        assert min(n[s] * rates[s] for s in STAGES) == pytest.approx(best)


def test_max_min_breaks_ties_in_stage_order() -> None:
    rates = dict.fromkeys(STAGES, 1.0)
    assert max_min(rates, UNIT, ONE_TYPE, 4, UNIT) == {"encoder": 2, "denoiser": 1, "decoder": 1}
    assert max_min(rates, UNIT, ONE_TYPE, 5, UNIT) == {"encoder": 2, "denoiser": 2, "decoder": 1}


def test_max_min_respects_ceilings_and_instance_size() -> None:
    rates = {"encoder": 1.0, "denoiser": 0.1, "decoder": 1.0}
    n = max_min(rates, UNIT, ONE_TYPE, 50, UNIT, ceiling={"denoiser": 10})
    assert n["denoiser"] == 10 and sum(n.values()) == 50  # the rest goes to the others
    n = max_min(rates, UNIT, ONE_TYPE, 50, UNIT, ceiling={"denoiser": 5, "encoder": 2})
    assert n["denoiser"] == 5 and n["encoder"] == 2 and n["decoder"] == 43
    per = {"encoder": 1, "denoiser": 4, "decoder": 1}
    n = max_min(rates, per, ONE_TYPE, 23, UNIT)
    assert n["denoiser"] * 4 + n["encoder"] + n["decoder"] <= 23
    assert n["denoiser"] == 5  # 20 GPUs; 3 left for the light stages


def test_max_min_respects_accelerator_counts() -> None:
    rates = {"encoder": 1.0, "denoiser": 0.01, "decoder": 1.0}
    types = {"encoder": "small", "denoiser": "big", "decoder": "small"}
    n = max_min(rates, UNIT, types, 100, UNIT, accelerator_counts={"big": 7, "small": None})
    assert n["denoiser"] == 7
    assert n["encoder"] + n["decoder"] == 93
    n = max_min(rates, UNIT, types, 100, UNIT, accelerator_counts={"big": 7, "small": 4})
    assert n == {"encoder": 2, "denoiser": 7, "decoder": 2}


@pytest.mark.parametrize("odd", [0.0, math.inf, math.nan])
def test_max_min_keeps_stages_without_a_finite_capacity_at_their_minimum(odd: float) -> None:
    rates = {"encoder": 1.0, "denoiser": 0.5, "decoder": odd}
    n = max_min(rates, UNIT, ONE_TYPE, 30, {"encoder": 1, "denoiser": 1, "decoder": 2})
    assert n["decoder"] == 2
    assert n["encoder"] + n["denoiser"] == 28
    assert n["denoiser"] == 18  # 10·1 vs 18·0.5; the tie at 9 vs 18·0.5 went to the encoder


def test_max_min_handles_large_budgets() -> None:
    rates = {"encoder": 1 / 0.3, "denoiser": 1 / 25.0, "decoder": 1 / 0.3}
    per = {"encoder": 1, "denoiser": 2, "decoder": 1}
    n = max_min(rates, per, ONE_TYPE, 5000, UNIT)
    used = n["encoder"] + 2 * n["denoiser"] + n["decoder"]
    assert 5000 - 2 < used <= 5000
    assert n["denoiser"] * 0.3 / 25 == pytest.approx(n["encoder"], abs=1.5)


def test_max_min_starts_at_the_minimum_even_past_the_budget() -> None:
    n = max_min(dict.fromkeys(STAGES, 1.0), UNIT, ONE_TYPE, 2, {"encoder": 2, "denoiser": 2})
    assert n == {"encoder": 2, "denoiser": 2, "decoder": 0}


# --- most_starved_first: the baselines' shares ----------------------------------------


def test_most_starved_first_grants_growth_to_the_stage_furthest_from_its_wish() -> None:
    wanted = {"encoder": 4, "denoiser": 30, "decoder": 1}
    current = {"encoder": 2, "denoiser": 20, "decoder": 2}
    out = most_starved_first(wanted, current, UNIT, ONE_TYPE, 27)
    assert out == {"encoder": 3, "denoiser": 23, "decoder": 1}  # the decoder's shrink applies
    assert sum(out.values()) == 27
    # accelerator counts hold too
    wanted = {"encoder": 1, "denoiser": 50, "decoder": 1}
    out = most_starved_first(wanted, current, UNIT, ONE_TYPE, 64, {"G": 32})
    assert sum(out.values()) == 32


def test_most_starved_first_leaves_a_stage_that_wants_none_at_zero() -> None:
    out = most_starved_first(
        {"encoder": 0, "denoiser": 3}, {"encoder": 2, "denoiser": 1}, UNIT, ONE_TYPE, 10
    )
    assert out == {"encoder": 0, "denoiser": 3}


# --- grow: the allocator itself -----------------------------------------------------


def test_grow_without_a_priority_follows_stage_order() -> None:
    start = dict.fromkeys(STAGES, 1)
    ceiling = dict.fromkeys(STAGES, 4)
    assert grow(start, ceiling, UNIT, ONE_TYPE, 8) == {"encoder": 4, "denoiser": 3, "decoder": 1}


def test_grow_skips_a_stage_that_does_not_fit_unless_told_to_stop() -> None:
    # The encoder's next instance needs 2 GPUs, 1 is left: the denoiser may still take it.
    per = {"encoder": 2, "denoiser": 1, "decoder": 1}
    start = dict.fromkeys(STAGES, 0)
    ceiling = {"encoder": 3, "denoiser": 1, "decoder": 0}
    assert grow(start, ceiling, per, ONE_TYPE, 5) == {"encoder": 2, "denoiser": 1, "decoder": 0}
    # Stopping there keeps the longest run in stage order that fits (a trim, last first).
    trimmed = grow(start, ceiling, per, ONE_TYPE, 5, stop_at_first_misfit=True)
    assert trimmed == {"encoder": 2, "denoiser": 0, "decoder": 0}


def test_grow_takes_any_priority_and_stage_names_beyond_the_pipeline() -> None:
    start = {"extra": 0, "decoder": 0}

    def decoder_first(stage: str, count: int) -> float:
        return count if stage == "decoder" else count + 10

    out = grow(
        start, {}, {"extra": 1, "decoder": 1}, {"extra": "G", "decoder": "G"}, 12, decoder_first
    )
    assert out == {"decoder": 11, "extra": 1}


def test_gpus_by_accelerator_and_within_counts() -> None:
    used = gpus_by_accelerator([("H100", 4), ("L40S", 2), ("H100", 3)])
    assert used == {"H100": 7, "L40S": 2}
    assert within_counts(used, {"H100": 7, "L40S": None})
    assert not within_counts(used, {"H100": 6, "L40S": None})
