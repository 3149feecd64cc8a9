"""Small asyncio helpers shared by the runtime, the sender and the peer pool."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterable


def raise_if_cancelled() -> None:
    """Honour a cancellation that a grpc.aio call absorbed.

    Cancelling a task that awaits a call which is just starting or just failed
    can be swallowed inside grpc.aio (the call ends with an error or EOF
    instead of CancelledError); the task's cancel request stays counted, so
    loops that retry on errors check it, or `stop()`/`close()` waits forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_all(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait until every one has ended."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
