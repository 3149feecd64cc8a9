from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from disagfusion.cli.common import add_transport_args
from disagfusion.worker.local.bench import (
    MODES,
    BenchParams,
    ModeResult,
    add_bench_args,
    bench_params,
    percentile,
    report,
)

PARAM_KEYS = {f.name for f in fields(BenchParams)}
RESULT_KEYS = {f.name for f in fields(ModeResult)}


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 100) == 100
    assert percentile([3.0, 1.0, 2.0], 50) == 2
    assert percentile([7.0], 95) == 7
    assert math.isnan(percentile([], 50))


def parser() -> argparse.ArgumentParser:
    # As disagfusion/cli.py creates the subparser: every flag shows its default.
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_args(p)
    add_transport_args(p)
    return p


def result(rps: float) -> ModeResult:
    return ModeResult(rps, 0.5, 0.9, 24, 0, 3, 5.0, 24 / rps)


def test_report_is_params_once_then_one_result_per_mode() -> None:
    argv = "--size 64x64 --steps 3 --requests 8 --concurrency 2 --warmup 1 --denoisers 2"
    args = parser().parse_args([*argv.split(), "--threads", "2", "--handoff-jitter-ms", "1.5"])
    out = report(bench_params(args, 5.0), {"sync": result(2.0), "async": result(4.0)})
    assert json.loads(json.dumps(out)) == out  # plain JSON
    assert list(out) == ["params", "modes"]
    assert list(out["modes"]) == ["sync", "async"]  # run order
    assert all(set(r) == RESULT_KEYS for r in out["modes"].values())
    assert out["modes"]["async"]["throughput_rps"] == 4.0
    assert out["params"] == {
        "model": "builtin:tiny-unet",
        "size": "64x64",
        "steps": 3,
        "prompt": "a red fox in the snow",
        "requests": 8,
        "concurrency": 2,
        "warmup": 1,
        "encoders": 1,
        "denoisers": 2,
        "decoders": 1,
        "threads": 2,
        "handoff_delay_ms": 5.0,
        "handoff_delay_auto": False,
        "handoff_jitter_ms": 1.5,
        "transport": "grpc",
        "max_batch": None,
        "batch_wait_ms": 0.0,
        "queue_order": None,
        "ratio": "flags",
        "stage_service_ms": None,
    }


def test_params_record_an_auto_delay_and_its_value() -> None:
    args = parser().parse_args(["--handoff-delay-ms", "auto"])
    params = bench_params(args, 110.0)
    assert (params.handoff_delay_ms, params.handoff_delay_auto) == (110.0, True)


def test_every_flag_has_help_and_shows_its_default() -> None:
    p = parser()
    for action in p._actions:
        assert action.help and action.help.strip(), action.option_strings
    text = " ".join(p.format_help().split())
    for shown in ("(default: 96)", "(default: async,sync,monolithic)"):
        assert shown in text


@pytest.mark.parametrize(
    "bad",
    [
        ["--requests", "0"],
        ["--concurrency", "x"],
        ["--warmup", "-1"],
        ["--handoff-delay-ms", "soon"],
        ["--handoff-delay-ms", "-5"],
        ["--handoff-jitter-ms", "nan"],
    ],
)
def test_bad_values_are_usage_errors(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(bad)
    assert exit_.value.code == 2


@pytest.mark.slow
def test_bench_json_from_the_command_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "disagfusion", "bench", "--json", "--modes", "async"]
    command += ["--requests", "2", "--concurrency", "1", "--warmup", "0", "--size", "64x64"]
    command += ["--steps", "2", "--handoff-delay-ms", "3", "--log-dir", str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    got = json.loads(out.stdout)
    assert set(got) == {"params", "modes"}
    params = got["params"]
    assert set(params) == PARAM_KEYS
    assert (params["requests"], params["concurrency"], params["warmup"]) == (2, 1, 0)
    assert (params["size"], params["steps"], params["handoff_delay_ms"]) == ("64x64", 2, 3.0)
    assert params["model"] == "builtin:tiny-unet" and params["handoff_delay_auto"] is False
    assert list(got["modes"]) == ["async"] and set(MODES) >= set(got["modes"])
    run = got["modes"]["async"]
    assert set(run) == RESULT_KEYS
    assert (run["completed"], run["failed"], run["processes"]) == (2, 0, 3)
    assert run["throughput_rps"] > 0 and run["wall_s"] > 0
    assert 0 < run["latency_p50_s"] <= run["latency_p95_s"]
    assert run["handoff_delay_ms"] == 3.0
