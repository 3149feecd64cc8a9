"""Progress of the request being computed, reported to its gateway.

Model code calls `disagfusion.worker.progress.report(step, total)` from the
compute thread (the denoiser's step callback); the runtime binds it to the
request with `bind()`. Reports are throttled (a request shorter than the interval sends
none), sent without waiting, and the gateway's answer says whether the
request is still wanted: a cancelled request raises RequestCancelled at the
next step, which frees the stage within one step time.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.worker.progress import SINK
from disagfusion.worker.runtime.payload import Payload
from disagfusion.worker.runtime.peers import ChannelCache

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.5


class ProgressReporter:
    def __init__(
        self,
        stage: str,
        channels: ChannelCache,
        loop: asyncio.AbstractEventLoop,
        min_interval_s: float = MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stage = stage
        self._channels = channels
        self._loop = loop
        self._interval = min_interval_s
        self._clock = clock
        self._cancelled: set[str] = set()

    def bind(self, *payloads: Payload) -> contextvars.Context:
        """A context whose report() goes to each payload's gateway: run compute in
        it. A batch is cancelled (the call stopped) only when all of it is; the
        rest of a partly cancelled batch runs on and the runtime drops the others."""
        context = contextvars.copy_context()
        context.run(SINK.set, self._sink(payloads))
        return context

    def cancelled(self, request_id: str) -> bool:
        return request_id in self._cancelled

    def cancel(self, request_id: str) -> None:
        """The gateway cancelled it (Cancel): the next step report stops the call."""
        self._cancelled.add(request_id)

    def forget(self, request_id: str) -> None:
        self._cancelled.discard(request_id)

    def _sink(self, payloads: tuple[Payload, ...]) -> Callable[[int, int], bool]:
        last = self._clock()
        rids = [p.request_id for p in payloads]

        def sink(step: int, total: int) -> bool:
            nonlocal last
            now = self._clock()
            if now - last >= self._interval:
                last = now
                for payload in payloads:
                    if payload.reply_to:
                        report = pb.ProgressReport(
                            request_id=payload.request_id, stage=self._stage, step=step, total=total
                        )
                        asyncio.run_coroutine_threadsafe(
                            self._send(payload.reply_to, report), self._loop
                        )
            return all(rid in self._cancelled for rid in rids)

        return sink

    async def _send(self, address: str, report: pb.ProgressReport) -> None:
        try:
            reply = await self._channels.stub(address).Progress(report, timeout=5.0)
        except Exception as err:  # progress is best effort; the result path has custody
            log.debug("progress to %s failed: %s", address, err)
            return
        if reply.cancelled:
            self._cancelled.add(report.request_id)
