"""Performance profiles: the file format, builtin calibration, and the profiler."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from disagfusion.cli import main
from disagfusion.scheduling.builtin_profiles import BUILTIN_PROFILES, builtin_profile
from disagfusion.scheduling.profile import (
    DEFAULT_SLO,
    STAGES,
    ProfileError,
    RequestShape,
    StageCost,
    parse_profile,
    parse_slo,
    profile_to_dict,
)
from disagfusion.scheduling.stages import MONOLITHIC
from disagfusion.worker.local.profiler import Measurement, fit_stage, measurement_shapes, nnls
from disagfusion.worker.models import describe_model

# --- the format ----------------------------------------------------------------


def test_service_time_model() -> None:
    cost = StageCost(a=1.0, b=2.0, c=0.5, d=0.25)
    shape = RequestShape(2000, 1000, 2, 10)  # P = 4
    assert shape.megapixels == 4.0
    assert cost.seconds(shape) == pytest.approx(1 + 2 * 4 + 0.5 * 4 * 10 + 0.25 * 16 * 10)


@pytest.mark.parametrize("name", list(BUILTIN_PROFILES))
def test_builtin_profiles_round_trip(name: str) -> None:
    profile = builtin_profile(name)
    again = parse_profile(json.loads(json.dumps(profile_to_dict(profile))))
    assert again == profile


@pytest.mark.parametrize(
    ("name", "stage", "seconds"),
    [
        ("qwen-image-h100", "encoder", 0.26),
        ("qwen-image-h100", "denoiser", 25.3),
        ("qwen-image-h100", "decoder", 0.31),
        ("wan2.1-14b-t2v-h100", "encoder", 0.89),
        ("wan2.1-14b-t2v-h100", "denoiser", 252.8),
        ("wan2.1-14b-t2v-h100", "decoder", 2.38),
    ],
)
def test_builtin_profiles_match_the_published_times(name: str, stage: str, seconds: float) -> None:
    profile = builtin_profile(name)
    t = profile.service_time(stage, "H100", profile.default_request)
    assert t == pytest.approx(seconds, rel=1e-3)


def test_gpus_per_instance_from_memory() -> None:
    profile = builtin_profile("qwen-image-h100-l40s")
    assert profile.gpus_per_instance("denoiser", "L40S") == 1  # 40.9 GB on 48 GB
    bigger = parse_profile(
        {
            "accelerators": [{"name": "S", "memory_gb": 24}],
            "stages": {s: {"S": {"a": 1, "memory_gb": 40.9}} for s in STAGES},
        }
    )
    assert bigger.gpus_per_instance("denoiser", "S") == 2
    assert bigger.gpus_per_instance(MONOLITHIC, "S") == 6  # 3 x 40.9 GB on 24 GB cards


def test_a_monolithic_pool_runs_on_the_first_type_every_stage_has() -> None:
    profile = parse_profile(
        {
            "accelerators": [{"name": "A", "count": 4}, {"name": "B"}],
            "stages": {
                "encoder": {"A": {"a": 1}, "B": {"a": 1}},
                "denoiser": {"A": {"a": 1}, "B": {"a": 1}},
                "decoder": {"B": {"a": 1}},
            },
        }
    )
    assert profile.default_accelerator("encoder") == "A"
    assert profile.options(MONOLITHIC) == ("B",)
    assert profile.default_accelerator(MONOLITHIC) == "B"
    assert profile.accelerator_counts() == {"A": 4, "B": None}


def test_the_slo_falls_back_to_the_profiles_then_to_the_default() -> None:
    qwen = builtin_profile("qwen-image-h100")
    assert qwen.slo_or_default("30s") == "30s"
    assert qwen.slo_or_default(None) == "60s"
    assert replace(qwen, default_slo=None).slo_or_default(None) == DEFAULT_SLO == "2x"


def test_parse_profile_lists_every_problem() -> None:
    with pytest.raises(ProfileError) as err:
        parse_profile(
            {
                "accelerators": [{"name": "G", "cost_per_hour": -1}],
                "stages": {
                    "encoder": {"G": {"a": "x"}},
                    "denoiser": {"H": {"c": 1}},
                    "vae": {},
                },
                "defaults": {"gpus": 2, "slo": "soon"},
            }
        )
    text = "\n".join(err.value.problems)
    for needle in (
        "cost_per_hour: must be >= 0",
        "stages.encoder.G.a: must be a number",
        "accelerator 'H' is not in accelerators",
        "stages.vae: unknown stage",
        "stages.decoder: required",
        "defaults.gpus",
        "defaults.slo",
    ):
        assert needle in text


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("30s", ("seconds", 30.0)), ("2x", ("slowdown", 2.0)), (" 1.5X", ("slowdown", 1.5))],
)
def test_parse_slo(text: str, parsed: tuple[str, float]) -> None:
    assert parse_slo(text) == parsed


@pytest.mark.parametrize("text", ["", "30", "0s", "0.5x", "fast", "nanx"])
def test_parse_slo_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="SLO"):
        parse_slo(text)


# --- fitting -------------------------------------------------------------------


def test_nnls_recovers_non_negative_coefficients() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.uniform(0.1, 2.0, size=(12, 3))
    truth = np.array([0.5, 0.0, 2.0])
    assert nnls(matrix, matrix @ truth) == pytest.approx(truth, abs=1e-9)


def test_nnls_clips_where_least_squares_goes_negative() -> None:
    matrix = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    target = np.array([3.0, 2.0, 1.0])  # plain least squares: slope -1
    sol = nnls(matrix, target)
    assert sol == pytest.approx([2.0, 0.0])  # the best flat line: the mean
    # No other non-negative point does better.
    best = np.sum((matrix @ sol - target) ** 2)
    for a in np.linspace(0, 4, 41):
        for b in np.linspace(0, 2, 21):
            assert best <= np.sum((matrix @ np.array([a, b]) - target) ** 2) + 1e-12


def test_fit_stage_recovers_a_denoiser_model() -> None:
    truth = StageCost(a=0.05, c=0.4, d=2.0)
    shapes = [RequestShape(w, w, 1, s) for w in (64, 128, 256) for s in (5, 10)]
    rows = [Measurement("denoiser", s, truth.seconds(s)) for s in shapes]
    assert fit_stage("denoiser", rows) == pytest.approx({"a": 0.05, "c": 0.4, "d": 2.0}, rel=1e-4)
    decoder = [Measurement("decoder", s, 0.01 + 0.5 * s.megapixels) for s in shapes]
    assert fit_stage("decoder", decoder) == pytest.approx({"a": 0.01, "b": 0.5}, rel=1e-4)
    encoder = [Measurement("encoder", s, 0.02) for s in shapes]
    assert fit_stage("encoder", encoder) == pytest.approx({"a": 0.02})


# --- the profiler on a real (tiny) model ---------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


def test_measurement_shapes_fit_the_model(cache_dir: Path) -> None:
    info = describe_model("builtin:tiny-unet", cache_dir=cache_dir)
    for quick in (True, False):
        shapes = measurement_shapes(info, quick)
        assert len({s.megapixels for s in shapes}) >= 2 and len({s.steps for s in shapes}) == 2
        for s in shapes:
            assert s.width % info.size_multiple == 0 and s.width <= info.max_size
    at_max = replace(info, default_size=(512, 512), max_size=512)  # can only go smaller
    assert {(s.width, s.height) for s in measurement_shapes(at_max, True)} == {
        (256, 256),
        (512, 512),
    }


@pytest.fixture(scope="module")
def measured(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`disagfusion profile --quick` on builtin:tiny-unet, written as YAML."""
    out = tmp_path_factory.mktemp("profile") / "tiny.yaml"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISAGFUSION_CACHE", str(cache_dir))
        args = ["profile", "--model", "builtin:tiny-unet", "--quick"]
        assert main([*args, "-o", str(out)]) == 0
    yield yaml.safe_load(out.read_text())


def test_profiler_output_is_a_valid_profile(measured: dict[str, Any]) -> None:
    profile = parse_profile(measured)
    (acc,) = profile.accelerators
    assert acc.name.startswith("cpu-") and acc.cost_per_hour == 0
    assert profile.default_request == RequestShape(64, 64, 1, 10)
    assert profile.startup_seconds >= 0
    for stage in STAGES:
        cost = profile.stages[stage][acc.name]
        assert 0 < cost.memory_gb < 1  # tiny weights, rounded up to the megabyte
        assert profile.gpus_per_instance(stage, acc.name) == 1


def test_profiler_denoiser_cost_grows_with_steps_and_pixels(measured: dict[str, Any]) -> None:
    profile = parse_profile(measured)
    acc = profile.accelerators[0].name

    def t(w: int, steps: int) -> float:
        return profile.service_time("denoiser", acc, RequestShape(w, w, 1, steps))

    assert t(64, 10) > 0
    assert t(64, 20) > t(64, 10)
    assert t(128, 10) > t(64, 10)


def test_profiler_predicts_what_it_measured(measured: dict[str, Any]) -> None:
    profile = parse_profile(measured)
    acc = profile.accelerators[0].name
    rows = measured["measurements"]
    assert {r["stage"] for r in rows} == set(STAGES)
    for r in rows:
        shape = RequestShape(r["width"], r["height"], 1, r["steps"])
        predicted = profile.service_time(r["stage"], acc, shape)
        assert r["seconds"] / 3 <= predicted <= r["seconds"] * 3, r


def test_profiler_fits_a_batch_term_for_each_stage(measured: dict[str, Any]) -> None:
    profile = parse_profile(measured)
    acc = profile.accelerators[0].name
    timed = {(r["stage"], r["batch"]) for r in measured["batch_measurements"]}
    assert timed == {(s, b) for s in STAGES for b in (1, 2, 4, 8)}
    for stage in STAGES:
        term = profile.stages[stage][acc].batch
        assert [b for b, _ in term] == [2, 4, 8], stage
        factors = [f for _, f in term]
        assert all(1 <= f <= b for b, f in term) and factors == sorted(factors), term


def test_profile_show_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--show", "builtin:qwen-image-h100", "--json"]) == 0
    shown = parse_profile(json.loads(capsys.readouterr().out))
    assert shown == builtin_profile("qwen-image-h100")
    assert main(["profile", "--show", "builtin:qwen-image-h100"]) == 0  # YAML
    assert parse_profile(yaml.safe_load(capsys.readouterr().out)) == shown
    assert main(["profile", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"builtin:{name}" in listed for name in BUILTIN_PROFILES)
    assert main(["profile", "--show", "builtin:nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown profile builtin:nope") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "does not exist"),
        (["--model", "builtin:tiny-unet", "--device", "bogus"], "device 'bogus'"),
        (["--model", "builtin:tiny-unet", "--repeats", "0"], "must be >= 1"),
    ],
)
def test_profile_bad_input_exits_2(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["profile", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "one of the arguments --model --show --list is required"),
        (["--list", "--show", "builtin:qwen-image-h100"], "not allowed with"),
        (["--model", "builtin:tiny-unet", "--repeats", "two"], "invalid int value"),
    ],
)
def test_profile_usage_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["profile", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("disagfusion profile: error: ") and message in err
    assert err.count("\n") == 1, err  # no usage block before the message
