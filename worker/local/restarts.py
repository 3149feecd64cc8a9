"""When to restart a local child that exited on its own, and when to give up (pure).

The launcher supervises its processes the way a kubelet supervises a pod's
containers: each unexpected exit is followed by a restart on the same ports
after an exponential back-off (1 s doubling to 30 s); once a child has been
restarted `max_restarts` times within `window_s` and exits again, it is
given up on. Exits older than the window are forgotten, so a child that ran
fine for a while starts again from the shortest back-off.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 300.0


@dataclass(frozen=True)
class RestartDecision:
    exits: tuple[float, ...]  # exit times inside the window, this one included
    give_up: bool
    delay_s: float  # before the restart (0 when giving up)

    @property
    def attempt(self) -> int:
        """Which restart in the window this is (1 for the first)."""
        return len(self.exits)


def on_exit(
    previous_exits: Sequence[float], now: float, policy: RestartPolicy = RestartPolicy()
) -> RestartDecision:
    """Decide what follows an unexpected exit at `now`, given the earlier exit times."""
    exits = (*(t for t in previous_exits if now - t < policy.window_s), now)
    restarts_done = len(exits) - 1  # every exit but the first followed a restart
    if restarts_done >= policy.max_restarts:
        return RestartDecision(exits, give_up=True, delay_s=0.0)
    delay = min(policy.max_backoff_s, policy.initial_backoff_s * 2**restarts_done)
    return RestartDecision(exits, give_up=False, delay_s=delay)


def describe_exit(returncode: int | None) -> str:
    """'code 1' or 'signal SIGKILL', as a person reads a process's end."""
    if returncode is None:
        return "no exit code"
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"
