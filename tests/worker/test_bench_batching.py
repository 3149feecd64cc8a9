"""`disagfusion bench --max-batch` (async once per batch setting) and `--ratio planner`."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from disagfusion.cli.common import add_transport_args
from disagfusion.worker.local.bench import (
    ModeResult,
    add_bench_args,
    batch_list,
    bench_params,
    comparisons,
    describe_activity,
    plan_runs,
    run_bench_command,
)
from disagfusion.worker.local.bench_stages import (
    BATCH_SIZE,
    SERVICE_TIME,
    activity,
    parse_sums,
    planned_counts,
)

BENCH = [sys.executable, "-m", "disagfusion", "bench"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_args(p)
    add_transport_args(p)
    return p


@pytest.mark.parametrize(
    ("text", "sizes"), [("1", [1]), ("1,4", [1, 4]), (" 8 , 2", [8, 2]), ("4,1,16", [4, 1, 16])]
)
def test_max_batch_is_a_comma_list_in_the_given_order(text: str, sizes: list[int]) -> None:
    assert batch_list(text) == sizes
    assert parser().parse_args(["--max-batch", text]).max_batch == sizes


@pytest.mark.parametrize(
    ("text", "named"),
    [("0", "got 0"), ("1,-2", "got -2"), ("x", "'x'"), ("1,,4", "''"), ("2,2", "2 given twice")],
)
def test_a_bad_max_batch_is_refused_naming_the_value(text: str, named: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=named):
        batch_list(text)


def test_only_async_runs_once_per_batch_setting() -> None:
    runs = plan_runs(["monolithic", "async", "sync"], [1, 4])
    assert [(r.label, r.mode, r.max_batch) for r in runs] == [
        ("monolithic", "monolithic", None),
        ("async@batch1", "async", 1),
        ("async@batch4", "async", 4),
        ("sync", "sync", None),
    ]


def test_without_max_batch_the_keys_are_the_modes() -> None:
    runs = plan_runs(["async", "sync", "monolithic"], None)
    assert [(r.label, r.max_batch) for r in runs] == [
        ("async", None),
        ("sync", None),
        ("monolithic", None),
    ]


def test_params_record_the_batch_settings() -> None:
    argv = ["--max-batch", "1,4", "--batch-wait-ms", "2.5", "--queue-order", "edf"]
    params = bench_params(parser().parse_args(argv), 0.0)
    assert (params.max_batch, params.batch_wait_ms, params.queue_order) == ([1, 4], 2.5, "edf")
    assert (params.ratio, params.stage_service_ms) == ("flags", None)


@pytest.mark.parametrize(
    "bad", [["--queue-order", "lifo"], ["--batch-wait-ms", "-1"], ["--processes", "2"]]
)
def test_bad_batching_and_ratio_flags_are_usage_errors(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(bad)
    assert exit_.value.code == 2


def test_processes_without_the_planner_ratio_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_bench_command(parser().parse_args(["--processes", "4"])) == 2
    assert "--processes needs --ratio planner" in capsys.readouterr().err


def result(rps: float, busy: dict[str, float] | None = None) -> ModeResult:
    return ModeResult(rps, 0.5, 0.9, 24, 0, 3, 0.0, 24 / rps, busy or {}, {})


def test_comparisons_name_each_ratio_worth_a_line() -> None:
    results = {
        "async@batch1": result(4.0),
        "async@batch4": result(10.0),
        "sync": result(2.0),
        "monolithic": result(8.0),
    }
    assert comparisons(results) == [
        "throughput async@batch1 / monolithic: 0.50x",
        "throughput async@batch4 / async@batch1: 2.50x",
        "throughput async@batch4 / monolithic: 1.25x",
    ]
    assert comparisons({"async": result(3.0), "sync": result(2.0)}) == [
        "throughput async / sync: 1.50x"
    ]


def test_activity_line_shows_busy_shares_and_batches_above_one() -> None:
    r = result(1.0, {"encoder": 0.05, "denoiser": 0.97})
    r.batch_mean = {"encoder": 1.0, "denoiser": 3.5}
    assert describe_activity(r) == "busy encoder 5% denoiser 97%, mean batch denoiser 3.5"


def metrics_text(service: list[float], batches: list[int]) -> str:
    registry = CollectorRegistry()
    names = ["role"]
    seconds = Histogram(SERVICE_TIME, "s", names, registry=registry).labels(role="denoiser")
    sizes = Histogram(BATCH_SIZE, "b", names, registry=registry).labels(role="denoiser")
    for t in service:
        seconds.observe(t)
    for b in batches:
        sizes.observe(b)
    return generate_latest(registry).decode()


def test_parse_sums_reads_each_histograms_sum_and_count() -> None:
    sums = parse_sums(metrics_text([0.5, 0.25], [4, 2, 1]))
    assert sums[SERVICE_TIME] == (0.75, 2.0)
    assert sums[BATCH_SIZE] == (7.0, 3.0)


def test_activity_counts_only_the_measured_interval() -> None:
    # Two denoisers: 0.1 s of warm-up before; then 3 s and 1 s of compute in 4 s.
    before = {"denoiser": [{SERVICE_TIME: (0.1, 1.0), BATCH_SIZE: (1.0, 1.0)}] * 2}
    after = {
        "denoiser": [
            {SERVICE_TIME: (3.1, 9.0), BATCH_SIZE: (9.0, 3.0)},
            {SERVICE_TIME: (1.1, 4.0), BATCH_SIZE: (4.0, 2.0)},
        ]
    }
    busy, batch = activity(before, after, 4.0)
    assert busy == {"denoiser": 0.5}  # (3 + 1) / 2 instances / 4 s
    assert batch == {"denoiser": round(11 / 3, 2)}  # 11 requests in 3 calls


def test_activity_leaves_out_the_batch_of_a_role_that_computed_nothing() -> None:
    idle = {"decoder": [{SERVICE_TIME: (0.2, 2.0), BATCH_SIZE: (2.0, 2.0)}]}
    busy, batch = activity(idle, idle, 2.0)
    assert busy == {"decoder": 0.0} and batch == {}


@pytest.mark.parametrize(
    ("processes", "counts"),
    [
        (3, (1, 1, 1)),
        (4, (1, 2, 1)),
        (6, (1, 4, 1)),
        (13, (1, 10, 1)),  # an 11th denoiser would wait on the decoder: left out
        (14, (1, 11, 2)),
    ],
)
def test_the_planner_splits_processes_by_service_time(
    processes: int, counts: tuple[int, int, int]
) -> None:
    # A denoiser 10x the decoder and 20x the encoder: the max-min split of `disagfusion plan`.
    service_s = {"encoder": 0.005, "denoiser": 0.1, "decoder": 0.01}
    planned = planned_counts(service_s, processes)
    assert (planned["encoder"], planned["denoiser"], planned["decoder"]) == counts


def test_the_planner_refuses_a_stage_it_has_no_time_for() -> None:
    with pytest.raises(ValueError, match="decoder"):
        planned_counts({"encoder": 0.005, "denoiser": 0.1, "decoder": math.nan}, 4)


def test_a_bad_max_batch_exits_non_zero_naming_the_value() -> None:
    out = subprocess.run(
        [*BENCH, "--max-batch", "1,0"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "--max-batch" in out.stderr and "got 0 in '1,0'" in out.stderr
    assert out.stdout == ""


SMALL = ["--requests", "4", "--concurrency", "4", "--warmup", "0", "--size", "64x64"]


@pytest.mark.slow
def test_bench_runs_async_once_per_batch_setting(tmp_path: Path) -> None:
    command = [*BENCH, "--json", "--modes", "async", "--max-batch", "1,2", *SMALL]
    command += ["--steps", "2", "--log-dir", str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    got = json.loads(out.stdout)
    params = got["params"]
    assert (params["max_batch"], params["batch_wait_ms"], params["queue_order"]) == (
        [1, 2],
        0,
        None,
    )
    assert list(got["modes"]) == ["async@batch1", "async@batch2"]
    for label, run in got["modes"].items():
        assert (run["completed"], run["failed"], run["processes"]) == (4, 0, 3), label
        assert run["throughput_rps"] > 0 and 0 < run["latency_p50_s"] <= run["latency_p95_s"]
    stages = {"encoder", "denoiser", "decoder"}
    for label, most in (("async@batch1", 1), ("async@batch2", 2)):
        run = got["modes"][label]
        assert set(run["stage_busy"]) == stages and set(run["batch_mean"]) == stages
        assert all(1 <= b <= most for b in run["batch_mean"].values()), run["batch_mean"]
    assert "throughput async@batch2 / async@batch1:" in out.stderr


@pytest.mark.slow
def test_bench_takes_the_planners_ratio_for_a_process_budget(tmp_path: Path) -> None:
    command = [*BENCH, "--json", "--modes", "async", "--ratio", "planner", *SMALL]
    command += ["--processes", "4", "--steps", "4", "--log-dir", str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    got = json.loads(out.stdout)
    params = got["params"]
    measured_s = {stage: ms / 1e3 for stage, ms in params["stage_service_ms"].items()}
    assert set(measured_s) == {"encoder", "denoiser", "decoder"}
    planned = planned_counts(measured_s, 4)
    counts = {"encoder": params["encoders"], "denoiser": params["denoisers"]}
    counts["decoder"] = params["decoders"]
    assert params["ratio"] == "planner" and counts == planned
    run = got["modes"]["async"]
    assert (run["completed"], run["failed"], run["processes"]) == (4, 0, sum(counts.values()))
    assert "planner ratio for 4 processes" in out.stderr


def test_the_default_size_is_the_model_s() -> None:
    from disagfusion.worker.local.bench import _default_size

    assert _default_size("builtin:tiny-unet") == "64x64"
