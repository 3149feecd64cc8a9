"""One `disagfusion` command as a subprocess, started as a user or a pod starts it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

START_S = 120.0  # loading a model on a busy CI machine


@contextmanager
def running(
    args: list[str], log: Path, ready: Callable[[], bool], timeout_s: float = START_S
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m disagfusion *args`, output to `log`, once `ready()` holds; the test
    fails with the log if it exits or is not ready in time. SIGTERM on the way out
    (SIGKILL if it does not stop)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "disagfusion", *args], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{args[0]} not ready (exit {proc.poll()}):\n{log.read_text()}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
