"""Supervision of local children: the pure restart policy, and LocalCluster.supervise
driving real (tiny) processes with an injected clock."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from disagfusion.worker.local.launcher import Child, LocalCluster, LocalOptions, StageLost
from disagfusion.worker.local.restarts import RestartPolicy, describe_exit, on_exit


def test_back_off_doubles_from_one_second_to_thirty() -> None:
    policy = RestartPolicy(max_restarts=10)
    exits: tuple[float, ...] = ()
    delays = []
    for now in range(0, 200, 20):
        decision = on_exit(exits, float(now), policy)
        exits = decision.exits
        delays.append(decision.delay_s)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]


def test_gives_up_after_five_failed_restarts_within_five_minutes() -> None:
    exits: tuple[float, ...] = ()
    for i in range(5):
        decision = on_exit(exits, 10.0 * i)
        assert not decision.give_up and decision.attempt == i + 1
        exits = decision.exits
    assert on_exit(exits, 60.0).give_up


def test_old_exits_are_forgotten_so_a_healthy_child_starts_over() -> None:
    exits = on_exit(on_exit((), 0.0).exits, 10.0).exits
    later = on_exit(exits, 10.0 + 300.0)
    assert later.exits == (310.0,) and later.delay_s == 1.0 and not later.give_up


def test_exit_descriptions() -> None:
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(1) == "code 1"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cluster(tmp_path: Path, argv: dict[str, list[str]]) -> tuple[LocalCluster, list[str]]:
    """A cluster whose children are the given small programs (no model, no ports)."""
    lines: list[str] = []
    clock = FakeClock()
    cluster = LocalCluster(LocalOptions(log_dir=tmp_path), report=lines.append, clock=clock)
    cluster.gateway = Child("gateway", "gateway", 0, 0, _sleeper())
    cluster.workers = {
        role: [Child(f"{role}-0", role, 0, 0, argv.get(role, _sleeper()))]
        for role in ("encoder", "denoiser", "decoder")
    }
    for child in cluster.children:
        cluster._spawn(child)
    return cluster, lines


def _sleeper() -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(60)"]


def _wait_exit(child: Child) -> None:
    assert child.proc is not None
    child.proc.wait(timeout=30)


def test_supervise_restarts_a_dead_child_after_its_back_off(tmp_path: Path) -> None:
    cluster, lines = _cluster(tmp_path, {})
    try:
        victim = cluster.workers["denoiser"][0]
        assert victim.proc is not None
        first_pid = victim.proc.pid
        victim.proc.kill()
        _wait_exit(victim)
        cluster.supervise()
        assert "denoiser-0 exited unexpectedly (signal SIGKILL); restarting in 1s" in lines[-1]
        cluster.supervise()  # the back-off has not passed yet
        assert victim.proc.pid == first_pid
        cluster._clock.now += 1.0  # type: ignore[attr-defined]
        cluster.supervise()
        assert victim.proc.pid != first_pid and victim.proc.poll() is None
        assert lines[-1] == "restarting denoiser-0"
    finally:
        cluster.stop()


def test_a_crash_loop_is_given_up_and_a_stage_left_empty_stops_the_pipeline(
    tmp_path: Path,
) -> None:
    crash = [sys.executable, "-c", "import sys; print('cannot start'); sys.exit(3)"]
    cluster, lines = _cluster(tmp_path, {"decoder": crash})
    clock: FakeClock = cluster._clock  # type: ignore[assignment]
    try:
        decoder = cluster.workers["decoder"][0]
        with pytest.raises(StageLost, match="no decoder instance left"):
            for _ in range(7):
                _wait_exit(decoder)
                cluster.supervise()
                clock.now += 31.0
                cluster.supervise()  # restart it
        assert decoder in cluster.given_up
        assert any("after 5 restarts within 300s; giving up on it" in line for line in lines)
        assert "cannot start" in lines[-1]  # the last lines of its log say why
        assert sum("restarting in" in line for line in lines) == 5
    finally:
        cluster.stop()


def test_a_removed_worker_is_not_restarted(tmp_path: Path) -> None:
    cluster, lines = _cluster(tmp_path, {})
    try:
        extra = Child("denoiser-1", "denoiser", 0, 0, _sleeper())
        cluster._spawn(extra)
        cluster.workers["denoiser"].append(extra)
        cluster.spare["denoiser"] = []
        removed = cluster.remove_worker("denoiser")
        assert removed is extra
        _wait_exit(extra)
        cluster.supervise()
        assert not any("denoiser-1" in line for line in lines)
    finally:
        cluster.stop()


def test_stop_ends_every_child_in_pipeline_order(tmp_path: Path) -> None:
    cluster, _ = _cluster(tmp_path, {})
    started = time.monotonic()
    cluster.stop()
    assert time.monotonic() - started < 10  # SIGTERM ends the sleepers at once
    assert all(c.proc is not None and c.proc.poll() is not None for c in cluster.children)
