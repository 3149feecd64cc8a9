"""`disagfusion serve --local` as a user runs it: a subprocess, its output, its children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagfusion.worker.local.launcher import free_port


@dataclass(frozen=True)
class Process:
    pid: int
    argv: list[str]

    def flag(self, name: str) -> str:
        return self.argv[self.argv.index(name) + 1]

    @property
    def role(self) -> str:
        return self.argv[self.argv.index("--role") + 1] if "--role" in self.argv else "gateway"

    @property
    def http_url(self) -> str:
        port = self.flag("--http-port") if "--http-port" in self.argv else self.flag("--port")
        return f"http://127.0.0.1:{port}"


class ServeLocal:
    """The launcher process; every line it prints is kept in `lines`."""

    def __init__(
        self,
        log_dir: Path,
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "disagfusion", "serve", "--local"]
        argv += ["--port", str(self.port), "--threads", "1", "--log-dir", str(log_dir), *args]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout_s: float = 240.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line with {text!r} within {timeout_s}s:\n{self.output()}")

    def wait_serving(self) -> None:
        self.wait_for_line("disagfusion serving")

    def children(self) -> list[Process]:
        return [Process(pid, cmdline(pid)) for pid in children_of(self.proc.pid)]

    def worker(self, role: str, index: int = 0) -> Process:
        found = sorted(
            (p for p in self.children() if p.role == role), key=lambda p: p.flag("--port")
        )
        return found[index]

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> ServeLocal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode() for part in raw.split(b"\0") if part]


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry))
    return kids


def wait_gone(pid: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return
        if state == "Z":
            return  # exited; only its parent's bookkeeping is left
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still running")


def is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_until(what: str, check: Any, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout_s}s")
