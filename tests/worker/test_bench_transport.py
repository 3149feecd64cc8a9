from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from typing import Any

import pytest

from disagfusion.cli import build_parser
from disagfusion.worker.local.bench_transport import (
    BACKEND_NAMES,
    Failure,
    add_transport_args,
    build_report,
    format_table,
    parse_backends,
    parse_size,
    parse_sizes,
    summarize,
)
from disagfusion.worker.transport import BACKENDS

SIZE_KEYS = {"gbps", "p50_s", "p95_s"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "disagfusion", "bench", "transport", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def assert_numbers(entry: dict[str, Any], sizes: list[str], ratio: bool) -> None:
    assert list(entry) == sizes
    for result in entry.values():
        assert set(result) == SIZE_KEYS | ({"ratio"} if ratio else set())
        assert result["gbps"] > 0 and math.isfinite(result["gbps"])
        assert 0 < result["p50_s"] <= result["p95_s"]
        if ratio:
            assert result["ratio"] > 0


# ---- pure


def test_backend_names_are_the_registry_s() -> None:
    assert tuple(BACKENDS) == BACKEND_NAMES


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("4MiB", 4 << 20),
        ("29MiB", 29 << 20),
        ("512KiB", 512 << 10),
        ("1GiB", 1 << 30),
        ("1000000", 1_000_000),
        ("1B", 1),
        ("10MB", 10_000_000),
        ("1.5MiB", 3 << 19),
        ("64mib", 64 << 20),
        (" 2 KiB ", 2048),
    ],
)
def test_sizes_parse(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "MiB", "4XB", "-1MiB", "0", "1.3B", "4 MiB MiB", "9GiB"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_size_lists_keep_their_labels_and_refuse_repeats() -> None:
    assert parse_sizes("4MiB, 1000") == [("4MiB", 4 << 20), ("1000", 1000)]
    for bad in ("4MiB,,8MiB", "4MiB,4MiB", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_sizes(bad)


def test_backend_lists() -> None:
    assert parse_backends("shm, grpc") == ["shm", "grpc"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown transport 'rdma'"):
        parse_backends("grpc,rdma")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_backends("grpc,grpc")


def test_defaults() -> None:
    p = argparse.ArgumentParser()
    add_transport_args(p)
    args = p.parse_args([])
    assert [label for label, _ in args.sizes] == ["4MiB", "29MiB", "64MiB"]
    assert args.backends == list(BACKEND_NAMES)
    assert (args.iterations, args.warmup, args.json) == (10, 2, False)


def test_every_flag_has_help_and_shows_its_default() -> None:
    (bench,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    (modes,) = (
        a for a in bench.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction)
    )
    sub = modes.choices["transport"]
    assert sub.prog.endswith("disagfusion bench transport")
    for action in sub._actions:
        assert action.help and action.help.strip(), action.dest
    text = " ".join(sub.format_help().split())
    for shown in ("(default: 4MiB,29MiB,64MiB)", "(default: grpc,shm,torch,nixl)"):
        assert shown in text
    assert "(default: 10)" in text and "(default: None)" not in text


def test_report_has_ratios_and_errors() -> None:
    baseline = {"1MiB": summarize(2_000_000, [0.001, 0.002, 0.004])}
    grpc = {"1MiB": summarize(2_000_000, [0.004, 0.004, 0.008])}
    report = build_report(baseline, {"grpc": grpc, "nixl": Failure("not installed", True)})
    assert json.loads(json.dumps(report)) == report
    assert report["baseline"] == {"1MiB": {"gbps": 1.0, "p50_s": 0.002, "p95_s": 0.004}}
    assert report["backends"]["grpc"]["1MiB"] == {
        "gbps": 0.5,
        "p50_s": 0.004,
        "p95_s": 0.008,
        "ratio": 0.5,
    }
    assert report["backends"]["nixl"] == {"error": "not installed"}
    table = format_table(report)
    assert "0.50x" in table and "nixl      error: not installed" in table


def test_bench_keeps_its_serving_mode_and_gains_transport() -> None:
    plain = build_parser().parse_args(["bench", "--json", "--modes", "async"])
    assert plain.func.__name__ == "_cmd_bench" and plain.bench_mode is None
    assert plain.modes == "async" and plain.json
    transport = build_parser().parse_args(["bench", "transport", "--sizes", "1MiB"])
    assert transport.func.__name__ == "_cmd_bench_transport"
    assert transport.sizes == [("1MiB", 1 << 20)] and not transport.json


# ---- the command


def test_grpc_against_the_baseline_from_the_command_line() -> None:
    sizes = ["1MiB", "2MiB"]
    out = cli("--json", "--sizes", ",".join(sizes), "--backends", "grpc", "--iterations", "3")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert list(got) == ["baseline", "backends"]
    assert_numbers(got["baseline"], sizes, ratio=False)
    assert list(got["backends"]) == ["grpc"]
    assert_numbers(got["backends"]["grpc"], sizes, ratio=True)


def test_shm_and_torch_have_numbers_where_they_exist() -> None:
    out = cli("--json", "--sizes", "1MiB", "--backends", "shm,torch", "--iterations", "2")
    assert out.returncode == 0, out.stderr
    backends = json.loads(out.stdout)["backends"]
    assert list(backends) == ["shm", "torch"]
    for name in ("shm", "torch"):
        module, _ = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            assert set(backends[name]) == {"error"} and "No module" in backends[name]["error"]
        else:
            assert_numbers(backends[name], ["1MiB"], ratio=True)


def test_an_unknown_backend_is_a_usage_error() -> None:
    out = cli("--backends", "grpc,rdma")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()  # one line, no traceback
    assert "unknown transport 'rdma'" in line and "grpc, shm, torch, nixl" in line
    assert out.stdout == ""


@pytest.mark.parametrize("sizes", ["4XB", "0", "4MiB,4MiB"])
def test_a_bad_size_is_a_usage_error(sizes: str) -> None:
    out = cli("--json", "--sizes", sizes)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "argument --sizes" in line and out.stdout == ""
