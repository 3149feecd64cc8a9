"""Least-loaded dispatch across the instances of a stage (pure policy).

Work-conserving: an instance with nothing to do is always picked before one
that holds work, so no instance idles while another has queued work that has
not yet been handed over. Load counts what the instance last reported plus
what this sender has handed it since (its reservations), so a burst from one
sender spreads instead of piling onto the instance that looked idlest.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceLoad:
    address: str
    healthy: bool
    draining: bool
    in_flight: int  # held by the instance: queued + computing + handing off
    queue_depth: int  # waiting for compute
    queue_capacity: int
    reserved: int = 0  # handed over by us since its last report

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
    lowest = min(inst.load for inst in candidates)
    tied = [inst for inst in candidates if inst.load == lowest]
    return tied[turn % len(tied)].address
