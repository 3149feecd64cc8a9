"""Per-request progress from model code, without model code knowing the runtime.

The runtime runs each compute in a context whose sink sends the request's
progress to its gateway (runtime/progress.py); model code only calls
`report(step, total)` after each step. RequestCancelled stops the loop.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

# (step, total) -> whether the request was cancelled.
SINK: contextvars.ContextVar[Callable[[int, int], bool] | None] = contextvars.ContextVar(
    "progress_sink", default=None
)


class RequestCancelled(Exception):
    """The request's gateway no longer wants it."""


def report(step: int, total: int) -> None:
    """Called after each step; raises RequestCancelled to stop the computation."""
    sink = SINK.get()
    if sink is not None and sink(step, total):
        raise RequestCancelled(f"cancelled after step {step} of {total}")


def step_callback(total: int) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """A diffusers `callback_on_step_end` that reports each finished step."""

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        report(step + 1, total)
        return kwargs

    return callback
