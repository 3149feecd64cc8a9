"""Speed-aware dispatch across the instances of a stage (pure policy).

The request goes where it is expected to finish first: the instance's load
(what it holds, plus what this sender handed it since its last report, so a
burst from one sender spreads) plus this request, times the seconds one
request takes there (its service-time EWMA from Health). With equal speeds
that is least-loaded: an idle instance is picked before one that holds work,
so no instance idles while another has queued work. With a slow pool beside a
fast one, a fast instance holding one request can still finish a new one
before an idle slow one, and gets it. An instance that has not measured its
speed yet counts as the mean of those that have (all unknown: equal).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

SAME_SPEED = 0.1  # expected finish times within 10 % count as a tie


@dataclass(frozen=True)
class InstanceLoad:
    address: str
    healthy: bool
    draining: bool
    in_flight: int  # held by the instance: queued + computing + handing off
    queue_depth: int  # waiting for compute
    queue_capacity: int
    reserved: int = 0  # handed over by us since its last report
    service_time_s: float = 0.0  # seconds per request there (EWMA); 0: not measured yet

    @property
    def load(self) -> int:
        return self.in_flight + self.reserved

    @property
    def has_room(self) -> bool:
        return self.queue_depth + self.reserved < max(self.queue_capacity, 1)


def choose_instance(
    loads: Sequence[InstanceLoad], exclude: Collection[str] = (), turn: int = 0
) -> str | None:
    """The address to try next, or None when no instance can take work now.

    `exclude` holds instances that refused this payload already; `turn`
    rotates ties so equally loaded instances share work.
    """
    candidates = [
        inst
        for inst in loads
        if inst.healthy and not inst.draining and inst.address not in exclude and inst.has_room
    ]
    if not candidates:
        return None
    known = [inst.service_time_s for inst in candidates if inst.service_time_s > 0]
    typical = sum(known) / len(known) if known else 1.0

    def finish(inst: InstanceLoad) -> float:
        return (inst.load + 1) * (inst.service_time_s or typical)

    # Relative tolerance: EWMAs of equally fast instances differ a little, and
    # those ties should rotate rather than always favour the same instance.
    soonest = min(finish(inst) for inst in candidates)
    tied = [inst for inst in candidates if finish(inst) <= soonest * (1 + SAME_SPEED)]
    return tied[turn % len(tied)].address
