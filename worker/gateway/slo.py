"""When each request should be done, for the stages' earliest-deadline-first order (pure).

The gateway stamps every request with an SLO deadline: '30s' means 30 s after
it arrived; '3x' means three times its predicted unloaded latency, as in the
simulator's slowdown SLO. The prediction is work times seconds per unit of work,
where work grows with pixels, frames, steps and images (the denoiser's share
dominates), and the rate is learned from the fastest recent requests (the
closest to unloaded: a loaded pipeline only ever adds time). Before anything
has finished the rate is a placeholder: deadlines then still order requests by
arrival and size, which is all EDF needs.
"""

from __future__ import annotations

from collections import deque

from disagfusion.scheduling.profile import parse_slo
from disagfusion.scheduling.queue_order import slo_deadline
from disagfusion.worker.params import GenerationParams

RECENT = 256  # completions the rate is learned from
FAST_SHARE = 0.1  # their fastest tenth stands for the unloaded rate
FIXED_WORK = 0.05  # per request: text encoding and hand-offs, in megapixel-steps
INITIAL_SECONDS_PER_WORK = 1.0


def work(params: GenerationParams) -> float:
    """Megapixel-steps of all the request's images and frames, plus a fixed part."""
    pixels = params.width * params.height * params.num_frames / 1e6
    return params.num_images * pixels * params.num_inference_steps + FIXED_WORK


class SloDeadlines:
    def __init__(self, slo: str) -> None:
        parse_slo(slo)  # ValueError names a bad SLO before anything runs
        self.slo = slo
        self._rates: deque[float] = deque(maxlen=RECENT)

    def predicted_s(self, params: GenerationParams) -> float:
        return work(params) * self.seconds_per_work()

    def deadline(self, arrival: float, params: GenerationParams) -> float:
        return slo_deadline(arrival, self.predicted_s(params), self.slo)

    def observe(self, params: GenerationParams, latency_s: float) -> None:
        """A request finished in `latency_s`."""
        if latency_s > 0:
            self._rates.append(latency_s / work(params))

    def seconds_per_work(self) -> float:
        if not self._rates:
            return INITIAL_SECONDS_PER_WORK
        ordered = sorted(self._rates)
        return ordered[int(FAST_SHARE * (len(ordered) - 1))]
