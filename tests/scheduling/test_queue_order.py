"""The shared queue policy: FIFO, EDF with an aging bound, batches by the head's key."""

from __future__ import annotations

import random

import pytest

from disagfusion.scheduling.queue_order import (
    DEFAULT_AGING_S,
    QUEUE_ORDERS,
    OrderedQueue,
    slo_deadline,
)


def drain(q: OrderedQueue[str]) -> list[str]:
    out = []
    while q:
        out.append(q.pop())
    return out


def test_the_orders_and_the_default_aging() -> None:
    assert QUEUE_ORDERS == ("fifo", "edf")
    assert DEFAULT_AGING_S == 60.0
    assert OrderedQueue().order == "fifo"


def test_slo_deadline_absolute_and_slowdown() -> None:
    assert slo_deadline(100.0, 7.0, "30s") == 130.0
    assert slo_deadline(100.0, 7.0, "3x") == 121.0
    with pytest.raises(ValueError, match="SLO 'soon'"):
        slo_deadline(0.0, 1.0, "soon")
    with pytest.raises(ValueError, match="predicted_s"):
        slo_deadline(0.0, -1.0, "3x")


def test_fifo_serves_by_arrival_with_push_order_breaking_ties() -> None:
    q: OrderedQueue[str] = OrderedQueue("fifo")
    q.push("b", arrival=2.0, deadline=0.0)  # deadlines do not matter to fifo
    q.push("a", arrival=1.0)
    q.push("c", arrival=2.0)
    q.push("d", arrival=3.0)
    assert len(q) == 4 and list(q) == ["a", "b", "c", "d"]
    assert drain(q) == ["a", "b", "c", "d"]
    assert not q and len(q) == 0


def test_edf_serves_the_earliest_deadline_first_and_ties_in_push_order() -> None:
    q: OrderedQueue[str] = OrderedQueue("edf")
    q.push("late", arrival=0.0, deadline=50.0)
    q.push("soon", arrival=1.0, deadline=10.0)
    q.push("tie-1", arrival=2.0, deadline=20.0)
    q.push("tie-2", arrival=3.0, deadline=20.0)
    q.push("none", arrival=4.0)  # no deadline: arrival + aging = 64
    assert list(q) == ["soon", "tie-1", "tie-2", "late", "none"]
    assert drain(q) == ["soon", "tie-1", "tie-2", "late", "none"]


def test_edf_ages_a_far_deadline_so_it_does_not_starve() -> None:
    q: OrderedQueue[str] = OrderedQueue("edf", aging_s=60.0)
    q.push("patient", arrival=0.0, deadline=10_000.0)  # served by t = 60 at the latest
    served = []
    for t in range(1, 100):  # a steady stream, each due 30 s after it arrives
        q.push(f"r{t}", arrival=float(t), deadline=t + 30.0)
        served.append(q.pop())
    where = served.index("patient")
    # overtaken by exactly the requests due before 60 (arrived before t = 30) ...
    assert served[:where] == [f"r{t}" for t in range(1, where + 1)]
    assert all(int(name[1:]) + 30 < 60 for name in served[:where])
    # ... and ahead of r30, due at 60 like its aged deadline (a tie: push order)
    assert where == 29 and served[where + 1] == "r30"


def test_without_aging_a_far_deadline_would_wait_longer() -> None:
    short: OrderedQueue[str] = OrderedQueue("edf", aging_s=5.0)
    long: OrderedQueue[str] = OrderedQueue("edf", aging_s=1000.0)
    for q in (short, long):
        q.push("far", arrival=0.0, deadline=500.0)
        for t in range(1, 20):
            q.push(f"r{t}", arrival=float(t), deadline=t + 10.0)
    assert drain(short).index("far") == 0  # 0 + 5 is before every other deadline
    assert drain(long).index("far") == 19  # 500 is after all of them


def test_a_batch_takes_the_head_then_its_key_in_order() -> None:
    q: OrderedQueue[str] = OrderedQueue("edf")
    q.push("a1", arrival=0.0, deadline=5.0, key="A")
    q.push("b1", arrival=0.0, deadline=1.0, key="B")
    q.push("a2", arrival=1.0, deadline=3.0, key="A")
    q.push("b2", arrival=1.0, deadline=9.0, key="B")
    q.push("a3", arrival=2.0, deadline=8.0, key="A")
    q.push("b3", arrival=2.0, deadline=2.0, key="B")
    assert q.head_key() == "B"
    assert q.pop_batch(2) == ["b1", "b3"]  # head b1, then B's next by deadline
    assert q.head_key() == "A"
    assert q.pop_batch(5) == ["a2", "a1", "a3"]
    assert q.pop_batch(5) == ["b2"]
    assert q.pop_batch(5) == [] and not q


def test_max_batch_one_and_key_none_never_batch() -> None:
    q: OrderedQueue[str] = OrderedQueue("fifo")
    q.push("x", arrival=0.0)
    q.push("y", arrival=1.0)
    q.push("k1", arrival=2.0, key="K")
    q.push("k2", arrival=3.0, key="K")
    assert q.head_key() is None
    assert q.pop_batch(4) == ["x"]  # key None: alone, though y has key None too
    assert q.pop_batch(4) == ["y"]
    assert q.pop_batch(1) == ["k1"]
    assert q.pop_batch(4) == ["k2"]
    with pytest.raises(ValueError, match="max_batch"):
        q.pop_batch(0)


def test_remove_by_identity() -> None:
    q: OrderedQueue[list[int]] = OrderedQueue("edf")
    first, twin, other = [1], [1], [2]  # first == twin, but they are different objects
    q.push(first, arrival=0.0, deadline=1.0, key="K")
    q.push(twin, arrival=0.0, deadline=2.0, key="K")
    q.push(other, arrival=0.0, deadline=3.0, key="K")
    assert q.remove(twin) is True
    assert q.remove(twin) is False
    assert q.remove([2]) is False  # equal, not identical
    assert len(q) == 2 and list(q) == [[1], [2]]
    assert q.pop_batch(3) == [first, other]
    assert q.pop_batch(3) == []


def test_empty_queue_errors() -> None:
    q: OrderedQueue[str] = OrderedQueue()
    with pytest.raises(IndexError):
        q.pop()
    with pytest.raises(IndexError):
        q.head_key()
    assert q.pop_batch(3) == []


@pytest.mark.parametrize("order", ["lifo", "EDF", ""])
def test_an_unknown_order_is_refused_by_name(order: str) -> None:
    with pytest.raises(ValueError, match=rf"unknown queue order '{order}' \(known: fifo, edf\)"):
        OrderedQueue(order)


@pytest.mark.parametrize("aging", [0.0, -1.0, float("inf"), float("nan")])
def test_aging_must_be_positive(aging: float) -> None:
    with pytest.raises(ValueError, match="aging_s"):
        OrderedQueue("edf", aging_s=aging)


@pytest.mark.parametrize("order", QUEUE_ORDERS)
def test_random_pushes_pops_and_removes_match_a_sorted_reference(order: str) -> None:
    """Against a plain sort by (effective rank, push number), with out-of-order
    arrivals (the heap) and in-order ones (the deque) mixed, keys and removals."""
    rng = random.Random(order)
    q: OrderedQueue[tuple[int]] = OrderedQueue(order, aging_s=20.0)
    ref: list[tuple[float, int, tuple[int], str | None]] = []
    clock = 0.0
    for n in range(3000):
        op = rng.random()
        if op < 0.55:
            clock += rng.random()
            arrival = clock if rng.random() < 0.7 else clock - rng.random() * 10
            deadline = arrival + rng.random() * 40 if rng.random() < 0.8 else None
            key = rng.choice(["a", "b", "c", None])
            item = (n,)
            q.push(item, arrival=arrival, deadline=deadline, key=key)
            rank = arrival
            if order == "edf":
                rank = min(arrival + 20.0, deadline if deadline is not None else math_inf)
            ref.append((rank, n, item, key))
            ref.sort(key=lambda row: (row[0], row[1]))
        elif op < 0.65 and ref:
            victim = rng.choice(ref)
            assert q.remove(victim[2]) is True
            ref.remove(victim)
        else:
            size = rng.randint(1, 4)
            want = []
            if ref:
                head = ref.pop(0)
                want.append(head[2])
                if head[3] is not None:
                    for row in [r for r in ref if r[3] == head[3]][: size - 1]:
                        ref.remove(row)
                        want.append(row[2])
            assert q.pop_batch(size) == want
        assert len(q) == len(ref)
    assert list(q) == [row[2] for row in ref]


math_inf = float("inf")
