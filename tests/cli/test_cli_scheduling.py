"""`disagfusion plan`, `simulate` and `profile` as a user starts them: the installed
console script in a subprocess, with the arguments the README shows."""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from disagfusion.scheduling.builtin_profiles import BUILTIN_PROFILES, builtin_profile
from disagfusion.scheduling.profile import STAGES, parse_profile

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SECTION = "## Scheduling and autoscaling"
SCRIPT = Path(sys.executable).parent / "disagfusion"
# What the README documents for each simulated policy and for a plan.
POLICY_KEYS = {
    "completed",
    "rejected",
    "throughput_rps",
    "latency_p50_s",
    "latency_p95_s",
    "latency_p99_s",
    "slo_attainment",
    "gpu_hours",
    "scale_events",
    "cost_usd",
}
PLAN_KEYS = {"stages", "throughput_rps", "gpus", "cost_per_hour", "currency", "bottleneck"}


def disagfusion(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the console script (`python -m disagfusion` where it is not installed)."""
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "disagfusion"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "100", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A scratch directory where the README's relative paths (examples/...) resolve."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    return tmp_path


# --- the README's examples, run as shown ----------------------------------------------


def readme_section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end >= 0 else None]


def shown_commands() -> list[tuple[str, str]]:
    """(command, output shown under it) for each `$ disagfusion` line in the section's
    code blocks."""
    found: list[tuple[str, str]] = []
    for block in re.findall(r"```\w*\n(.*?)```", readme_section(), flags=re.DOTALL):
        for chunk in re.split(r"^\$ ", block, flags=re.MULTILINE)[1:]:
            command, _, output = chunk.partition("\n")
            if command.startswith("disagfusion "):
                found.append((command, output))
    return found


def same_output(printed: str, shown: str) -> bool:
    """Equal text; JSON is compared as data (the README lays it out more compactly)."""
    if shown.lstrip().startswith("{"):
        return bool(json.loads(printed) == json.loads(shown))
    return printed.strip().splitlines() == shown.strip().splitlines()


def test_the_readme_shows_the_balance_rule_plan() -> None:
    commands = dict(shown_commands())
    rule = "disagfusion plan --profile examples/profiles/balance-rule.yaml --gpus 800"
    assert rule in commands
    rows = {line.split()[0]: line.split()[1] for line in commands[rule].splitlines()[2:5]}
    assert rows == {"encoder": "21", "denoiser": "778", "decoder": "1"}
    assert "51.87 req/s" in commands[rule] and "$1,600.00/h" in commands[rule]


@pytest.mark.parametrize(
    ("command", "shown"), [pytest.param(c, s, id=c) for c, s in shown_commands()]
)
def test_readme_command_prints_what_the_readme_shows(
    workdir: Path, command: str, shown: str
) -> None:
    printed = ok(disagfusion(*shlex.split(command)[1:], cwd=workdir))
    assert same_output(printed, shown), printed


def test_the_readme_cites_only_files_in_the_repository() -> None:
    text = README.read_text()
    assert "../shared" not in text
    for root in ("disagfusion", "operator", "worker"):
        for path in (REPO / root).glob("**/*.py"):
            assert "../shared" not in path.read_text(), path
    cited = set(re.findall(r"(?:docs|examples)/[\w./-]*\w", readme_section()))
    assert {"docs/calibration.md", "examples/profiles/balance-rule.yaml"} <= cited
    for path in cited:
        assert (REPO / path).exists(), path


def test_the_calibration_notes_keep_their_sources() -> None:
    text = (REPO / "docs" / "calibration.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "H100" in line]
    published = {"0.26 s": "25.3 s", "0.89 s": "252.8 s"}  # what the builtin profiles use
    for encoder, denoiser in published.items():
        (row,) = [r for r in rows if encoder in r]
        assert denoiser in row and "LightX2V" in row.split("|")[-2]  # the source column
    assert "t_t/t_e = 37.5" in text and "51.9 req/s" in text


# --- plan ----------------------------------------------------------------------------


def test_plan_json_for_the_balance_rule() -> None:
    out = ok(
        disagfusion(
            "plan", "--profile", "examples/profiles/balance-rule.yaml", "--gpus", "800", "--json"
        )
    )
    doc = json.loads(out)
    assert set(doc) == PLAN_KEYS
    assert {s: doc["stages"][s]["replicas"] for s in STAGES} == {
        "encoder": 21,
        "denoiser": 778,
        "decoder": 1,
    }
    assert round(doc["throughput_rps"], 1) == 51.9
    assert (doc["gpus"], doc["cost_per_hour"], doc["currency"]) == (800, 1600.0, "USD")


def test_plan_for_a_rate_in_usd() -> None:
    out = ok(disagfusion("plan", "--profile", "builtin:qwen-image-h100-l40s", "--rate", "1"))
    assert out.startswith("plan for qwen-image-h100-l40s, 1 req/s")
    assert re.search(r"cost \$[\d,]+\.\d\d/h, bottleneck denoiser$", out.strip())


# --- simulate ------------------------------------------------------------------------


def test_simulate_json_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "out.png"
    out = ok(
        disagfusion(
            "simulate",
            "--trace",
            "builtin:steady",
            "--profile",
            "builtin:qwen-image-h100",
            "--gpus",
            "8",
            "--requests",
            "60",
            "--policy",
            "static-disagg,hybrid",
            "--json",
            "--plot",
            str(png),
        )
    )
    doc = json.loads(out)
    assert list(doc["policies"]) == ["static-disagg", "hybrid"]
    for row in doc["policies"].values():
        assert set(row) >= POLICY_KEYS
        assert row["completed"] + row["rejected"] == doc["requests"] > 0
    width, height = png_size(png)
    assert height >= 2 * 250 and width <= 2.5 * height


def test_dump_trace_as_the_readme_shows(tmp_path: Path) -> None:
    # README: `disagfusion simulate --dump-trace builtin:NAME -o t.jsonl`, no --profile
    result = disagfusion(
        "simulate", "--dump-trace", "builtin:steady", "-o", "t.jsonl", cwd=tmp_path
    )
    ok(result)
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(rows) > 1000 and f"{len(rows)} requests" in result.stderr
    assert all(set(r) == {"t", "width", "height", "frames", "steps"} for r in rows)
    times = [r["t"] for r in rows]
    assert times == sorted(times) and times[0] >= 0


def test_simulate_compares_pools_on_the_mixed_profile_by_default() -> None:
    args = ["simulate", "--trace", "builtin:burst", "--profile", "builtin:qwen-image-h100-l40s"]
    out = json.loads(ok(disagfusion(*args, "--slo", "120s", "--load", "1.34", "--json")))
    policies = out["policies"]
    assert "hybrid-pools" in policies and "hybrid" in policies
    assert policies["hybrid-pools"]["slo_attainment"] > policies["hybrid"]["slo_attainment"]
    one_type = ["simulate", "--trace", "builtin:steady", "--profile", "builtin:qwen-image-h100"]
    assert "hybrid-pools" not in json.loads(ok(disagfusion(*one_type, "--json")))["policies"]
    base = json.loads(ok(disagfusion(*args, "--policy", "hybrid", "--json")))
    more = json.loads(ok(disagfusion(*args, "--policy", "hybrid", "--load", "1.34", "--json")))
    assert more["requests"] == pytest.approx(1.34 * base["requests"], rel=0.05)


def test_simulate_list_json() -> None:
    doc = json.loads(ok(disagfusion("simulate", "--list", "--json")))
    assert {p["name"] for p in doc["profiles"]} == {f"builtin:{n}" for n in BUILTIN_PROFILES}
    names = [t["name"] for t in doc["traces"]]
    assert "builtin:mix-shift" in names and "builtin:mixed-light-heavy" in names
    assert "hybrid" in doc["policies"]


# --- profile -------------------------------------------------------------------------


def test_profile_list_and_show() -> None:
    listed = ok(disagfusion("profile", "--list"))
    assert [line.split()[0] for line in listed.splitlines()] == [
        f"builtin:{n}" for n in BUILTIN_PROFILES
    ]
    shown = yaml.safe_load(ok(disagfusion("profile", "--show", "builtin:qwen-image-h100")))
    assert parse_profile(shown) == builtin_profile("qwen-image-h100")
    as_json = json.loads(ok(disagfusion("profile", "--show", "builtin:qwen-image-h100", "--json")))
    assert as_json == shown


@pytest.mark.slow
def test_profile_measures_the_tiny_model(tmp_path: Path) -> None:
    out = disagfusion(
        "profile",
        "--model",
        "builtin:tiny-unet",
        "--quick",
        "--json",
        env={"DISAGFUSION_CACHE": str(tmp_path / "cache")},
    )
    doc = json.loads(ok(out))
    profile = parse_profile(doc)
    (acc,) = profile.accelerators
    for stage in STAGES:
        assert profile.service_time(stage, acc.name, profile.default_request) > 0
    assert {m["stage"] for m in doc["measurements"]} == set(STAGES)


# --- help and errors -----------------------------------------------------------------


def option_blocks(help_text: str) -> dict[str, str]:
    """Each option's help entry, keyed by its first flag."""
    blocks: dict[str, str] = {}
    current = ""
    for line in help_text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line.strip()
        elif current and line.startswith("   "):
            blocks[current] += " " + line.strip()
        else:
            current = ""
    return blocks


@pytest.mark.parametrize("command", ["plan", "profile", "simulate"])
def test_every_flag_has_help_and_shows_its_default(command: str) -> None:
    blocks = option_blocks(ok(disagfusion(command, "--help")))
    blocks.pop("-h")
    assert len(blocks) >= 6
    for flag, text in blocks.items():
        assert len(text.split()) >= 4, f"{flag} has no help: {text!r}"
        assert "default" in text or "required" in text, f"{flag} shows no default: {text!r}"
        assert "(default: None)" not in text, text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--gpus", "-1"], "arguments are required: --profile"),
        (["plan", "--profile", "builtin:qwen-image-h100", "--gpus", "-1"], "at least 3"),
        (["plan", "--profile", "nope.yaml", "--gpus", "4"], "cannot read nope.yaml"),
        (["plan", "--profile", "builtin:qwen-image-h100", "--gpus", "lots"], "invalid int"),
        (["simulate", "--trace", "nope", "--profile", "builtin:qwen-image-h100"], "trace nope"),
        (["simulate", "--trace", "builtin:steady"], "--profile is required"),
        (["simulate", "--dump-trace", "steady"], "builtin:NAME"),
        (["profile", "--show", "builtin:nope"], "unknown profile builtin:nope"),
        (["profile"], "one of the arguments --model --show --list is required"),
        (
            [
                *["simulate", "--trace", "builtin:steady", "--profile", "builtin:qwen-image-h100"],
                "--load",
                "0",
            ],
            "--load must be a positive number",
        ),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = disagfusion(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "error: " in result.stderr and "Traceback" not in result.stderr
