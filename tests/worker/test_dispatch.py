"""Speed-aware, work-conserving choice of the next instance (pure policy)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from disagfusion.worker.runtime.dispatch import InstanceLoad, choose_instance


def inst(
    address: str,
    in_flight: int = 0,
    queue_depth: int = 0,
    queue_capacity: int = 2,
    reserved: int = 0,
    healthy: bool = True,
    draining: bool = False,
) -> InstanceLoad:
    return InstanceLoad(
        address=address,
        healthy=healthy,
        draining=draining,
        in_flight=in_flight,
        queue_depth=queue_depth,
        queue_capacity=queue_capacity,
        reserved=reserved,
    )


def test_idle_instance_is_preferred_over_a_busy_one() -> None:
    loads = [inst("a", in_flight=1), inst("b"), inst("c", in_flight=2, queue_depth=1)]
    for turn in range(5):
        assert choose_instance(loads, turn=turn) == "b"


def test_least_loaded_wins_when_none_is_idle() -> None:
    loads = [inst("a", in_flight=3, queue_depth=1), inst("b", in_flight=2, queue_depth=1)]
    assert choose_instance(loads) == "b"


@pytest.mark.parametrize(
    "skipped",
    [
        inst("idle", healthy=False),
        inst("idle", draining=True),
        inst("idle", queue_depth=2, queue_capacity=2),
        inst("idle", reserved=2, queue_capacity=2),
    ],
    ids=["unhealthy", "draining", "queue-full", "full-with-reservations"],
)
def test_instances_that_cannot_take_work_are_skipped(skipped: InstanceLoad) -> None:
    busy = inst("busy", in_flight=1, queue_depth=1)
    for turn in range(3):
        assert choose_instance([skipped, busy], turn=turn) == "busy"


def test_excluded_instances_are_skipped() -> None:
    loads = [inst("a"), inst("b", in_flight=1)]
    assert choose_instance(loads, exclude={"a"}) == "b"
    assert choose_instance(loads, exclude=["a", "b"]) is None


def test_ties_rotate_with_turn() -> None:
    loads = [inst("a"), inst("b", in_flight=1), inst("c"), inst("d")]
    picks = [choose_instance(loads, turn=t) for t in range(6)]
    assert picks == ["a", "c", "d", "a", "c", "d"]


@pytest.mark.parametrize(
    "loads",
    [
        [],
        [inst("a", healthy=False), inst("b", draining=True)],
        [inst("a", queue_depth=2), inst("b", queue_depth=1, reserved=1)],
    ],
    ids=["no-instances", "none-usable", "all-full"],
)
def test_none_when_nothing_can_take_work(loads: list[InstanceLoad]) -> None:
    assert choose_instance(loads) is None


def test_reservations_count_as_load() -> None:
    a, b = inst("a"), inst("b")
    # We handed one payload to "a" that its last report does not show yet.
    assert choose_instance([replace(a, reserved=1), b], turn=0) == "b"
    assert choose_instance([replace(a, reserved=1), b], turn=1) == "b"
    # ... and once both hold one, they tie again.
    loads = [replace(a, reserved=1), replace(b, in_flight=1)]
    assert {choose_instance(loads, turn=t) for t in range(2)} == {"a", "b"}


def test_zero_capacity_still_takes_one_payload() -> None:
    assert choose_instance([inst("a", queue_capacity=0)]) == "a"
    assert choose_instance([inst("a", queue_capacity=0, queue_depth=1)]) is None


# --- speed-aware: the expected finish time, (load + 1) x seconds per request ---------


def timed(address: str, seconds: float, in_flight: int = 0, capacity: int = 4) -> InstanceLoad:
    return replace(
        inst(address, in_flight=in_flight, queue_capacity=capacity), service_time_s=seconds
    )


def test_a_fast_busy_instance_beats_an_idle_slow_one_when_it_finishes_first() -> None:
    fast, slow = timed("fast", 1.0, in_flight=1), timed("slow", 2.8)
    assert choose_instance([fast, slow]) == "fast"  # 2 x 1.0 s < 2.8 s
    busier = timed("fast", 1.0, in_flight=2)
    assert {choose_instance([busier, slow], turn=t) for t in (0, 1)} == {"fast", "slow"}  # 3 ~ 2.8
    assert choose_instance([timed("fast", 1.0, in_flight=3), slow]) == "slow"  # 4.0 s > 2.8 s


def test_shares_follow_speed_under_load() -> None:
    """Handing requests one by one to the soonest finisher gives each instance a
    share in proportion to its speed."""
    loads = {"fast": timed("fast", 1.0, capacity=100), "slow": timed("slow", 2.7, capacity=100)}
    for turn in range(370):
        pick = choose_instance(list(loads.values()), turn=turn)
        assert pick is not None
        loads[pick] = replace(loads[pick], in_flight=loads[pick].in_flight + 1)
    fast, slow = loads["fast"].in_flight, loads["slow"].in_flight
    assert abs(fast / slow - 2.7) / 2.7 < 0.2, (fast, slow)


def test_equal_speeds_are_least_loaded_and_unknown_speeds_count_as_the_mean() -> None:
    assert choose_instance([timed("a", 1.0, in_flight=1), timed("b", 1.05)]) == "b"
    unknown = inst("new")  # no EWMA yet: as fast as the others on average
    assert choose_instance([timed("a", 2.0, in_flight=1), unknown]) == "new"
    assert choose_instance([timed("a", 2.0), replace(unknown, in_flight=1)]) == "a"
