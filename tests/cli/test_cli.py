"""The command line as a user meets it: help on every flag, one-line errors, exit 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from disagfusion.cli import build_parser
from disagfusion.cli.gateway import parse_topology
from disagfusion.cli.serve import _instance_counts


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_flag_has_a_help_line_that_shows_its_default(command: str) -> None:
    sub = _subparsers()[command]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, (command, action.dest)
    text = sub.format_help()
    for action in sub._actions:
        shown_default = action.default not in (None, argparse.SUPPRESS) and not action.required
        if shown_default and action.option_strings:
            assert "default" in (sub._get_formatter()._get_help_string(action) or ""), (
                command,
                action.dest,
            )
    assert "(default: None)" not in text


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "disagfusion", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["serve", "--local", "--port", "99999"], "a port is 1..65535, got 99999"),
        (["serve", "--local", "--denoisers", "0"], "must be >= 1"),
        (["gateway", "--grpc-port", "5000", "--topology", "notjson"], "not valid JSON"),
        (
            ["gateway", "--grpc-port", "5000", "--topology", '{"encoder": []}'],
            "encoder: expected a non-empty list",
        ),
        (
            ["generate", "a fox", "--in-process", "-o", "/nonexistent/dir/x.png"],
            "the folder /nonexistent/dir does not exist",
        ),
        (["worker", "--stage", "painter", "--port", "1", "--http-port", "2"], "invalid choice"),
        (["nope"], "invalid choice: 'nope'"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], says: str) -> None:
    done = _run(*args)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_topology_accepts_every_stage_or_the_monolithic_baseline() -> None:
    full = '{"encoder": ["a:1"], "denoiser": ["b:2", "c:3"], "decoder": ["d:4"]}'
    assert parse_topology(full)["denoiser"] == ["b:2", "c:3"]
    assert parse_topology('{"monolithic": ["m:1"]}') == {"monolithic": ["m:1"]}
    for bad, says in [
        ('{"encoder": ["a:1"]}', "denoiser: expected"),
        ('{"encoder": ["a"], "denoiser": ["b:2"], "decoder": ["d:4"]}', "'a' is not a host:port"),
        ('{"encoder": ["a:1"], "denoiser": ["b:2"], "decoder": ["d:4"], "vae": []}', "vae"),
        ("[1]", "expected a JSON object"),
        ("@/nonexistent.json", "cannot read"),
    ]:
        with pytest.raises(ValueError, match=says):
            parse_topology(bad)


def test_the_banner_counts_instances_in_plain_english() -> None:
    assert _instance_counts({"encoder": [1], "denoiser": [1, 2], "decoder": [1]}) == (
        "1 encoder, 2 denoisers, 1 decoder"
    )
