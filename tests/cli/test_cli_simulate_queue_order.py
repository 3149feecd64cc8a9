"""`disagfusion simulate --queue-order` and `--max-batch`, run as a user runs them:
`python -m disagfusion` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE = ["simulate", "--trace", "builtin:mixed-light-heavy", "--profile", "builtin:qwen-image-h100"]
BASE += ["--gpus", "8", "--requests", "300", "--policy", "static-disagg,hybrid"]


def disagfusion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "disagfusion", *args],
        cwd=REPO,
        env={**os.environ, "COLUMNS": "100"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def as_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def test_two_orders_give_one_block_each_in_the_order_given() -> None:
    out = as_json(disagfusion(*BASE, "--queue-order", "edf,fifo", "--json"))
    assert "policies" not in out
    assert list(out["queue_orders"]) == ["edf", "fifo"]
    for block in out["queue_orders"].values():
        assert set(block) == {"policies"}
        assert set(block["policies"]) == {"static-disagg", "hybrid"}
        for row in block["policies"].values():
            assert row["completed"] + row["rejected"] + row["unfinished"] == out["requests"]
    assert out["slo"] == "3x"  # the trace's own SLO, no --slo given
    edf, fifo = (out["queue_orders"][o]["policies"]["static-disagg"] for o in ("edf", "fifo"))
    assert edf != fifo  # the order changed who waited


def test_one_order_keeps_the_policies_shape() -> None:
    single = as_json(disagfusion(*BASE, "--queue-order", "fifo", "--json"))
    default = as_json(disagfusion(*BASE, "--json"))
    assert set(single) == set(default) and "queue_orders" not in single
    assert single["policies"] == default["policies"]  # fifo is the default
    explicit = as_json(disagfusion(*BASE, "--slo", "60s", "--json"))
    assert explicit["slo"] == "60s"  # --slo wins over the trace's SLO


def test_max_batch_is_reported_and_the_table_names_each_order() -> None:
    out = as_json(disagfusion(*BASE, "--max-batch", "4", "--json"))
    assert out["max_batch"] == 4 and set(out["policies"]) == {"static-disagg", "hybrid"}
    table = disagfusion(*BASE, "--queue-order", "fifo,edf")
    assert table.returncode == 0, table.stderr
    assert "queue order fifo:" in table.stdout and "queue order edf:" in table.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--queue-order", "fifo,lifo"], "unknown queue order lifo (known: fifo, edf)"),
        (["--queue-order", ","], "unknown queue order (none)"),
        (["--queue-order", "edf,edf"], "names an order twice"),
        (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    ],
)
def test_bad_orders_and_batches_exit_non_zero_by_name(extra: list[str], message: str) -> None:
    result = disagfusion(*BASE, *extra, "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_profile_s_batch_limits_apply_unless_max_batch_says_otherwise(tmp_path: Path) -> None:
    profile = tmp_path / "batching.json"
    profile.write_text(
        json.dumps(
            {
                "name": "batching",
                "accelerators": [{"name": "G", "cost_per_hour": 2.0, "memory_gb": 80}],
                "default_request": {"width": 512, "height": 512, "frames": 1, "steps": 20},
                "defaults": {"gpus": 8, "slo": "120s"},
                "stages": {
                    "encoder": {"G": {"a": 0.05}},
                    "denoiser": {"G": {"a": 4.0, "batch": {"2": 1.1, "4": 1.5}, "max_batch": 4}},
                    "decoder": {"G": {"a": 0.05}},
                },
            }
        )
    )
    base = ["simulate", "--trace", "builtin:steady", "--profile", str(profile), "--gpus", "8"]
    base += ["--requests", "400", "--policy", "static-disagg", "--json"]
    own = as_json(disagfusion(*base))
    assert own["max_batch"] == {"encoder": 1, "denoiser": 4, "decoder": 1}
    off = as_json(disagfusion(*base, "--max-batch", "1"))
    assert "max_batch" not in off
    assert own["policies"] != off["policies"]  # the instances batched
