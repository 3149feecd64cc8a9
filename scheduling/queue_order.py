"""The order a stage serves its queue in, and which requests share a batch (pure).

One policy for the stage inbox and for the simulator, so both serve the same
request next:

- ``fifo``: by arrival (ties: push order).
- ``edf``: earliest deadline first, by the effective deadline
  ``min(deadline, arrival + aging_s)`` (no deadline: ``arrival + aging_s``).
  The aging bound means a request is overtaken only by requests whose deadline
  is earlier than its own arrival + aging_s, so nothing starves however far its
  deadline. Ties by push order (FIFO among equal deadlines).

A batch is the head (by the order) and then further requests with the head's
key, in order. Key None never batches. There is no clock: times come in.

Cost: push and pop are O(log n); a batch of b is O(b log n). One heap holds
every entry, one heap per key holds that key's entries; an entry served
from one heap, or removed, is marked dead and dropped when it surfaces in
the other (lazy deletion), with a rebuild when dead entries pile up.
`remove` finds its item by a scan, O(n): cancellations are rare, and keeping
an index would tax every push and pop (the simulator makes millions). Rows
pushed in rank order (FIFO with the clock's arrivals, the common case) go to
a sorted deque instead of the heap: O(1) each way.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from disagfusion.scheduling.profile import parse_slo

QUEUE_ORDERS: tuple[str, ...] = ("fifo", "edf")
DEFAULT_AGING_S: float = 60.0

T = TypeVar("T")


def slo_deadline(arrival: float, predicted_s: float, slo: str) -> float:
    """When a request that arrived at `arrival` must be done: '30s' -> arrival + 30,
    '3x' -> arrival + 3 x `predicted_s` (its unloaded latency). ValueError names a bad SLO."""
    kind, value = parse_slo(slo)
    if kind == "seconds":
        return arrival + value
    if not predicted_s >= 0 or math.isinf(predicted_s):
        raise ValueError(f"predicted_s must be a finite number >= 0, got {predicted_s!r}")
    return arrival + value * predicted_s


class _Entry(Generic[T]):
    __slots__ = ("item", "key", "live")

    def __init__(self, item: T, key: Hashable) -> None:
        self.item, self.key, self.live = item, key, True


_Row = tuple[float, int, _Entry[T]]  # (rank, push number, entry): push numbers break ties


class OrderedQueue(Generic[T]):
    """A queue served in `order` ("fifo" or "edf"), optionally in batches by key."""

    def __init__(self, order: str = "fifo", aging_s: float = DEFAULT_AGING_S) -> None:
        if order not in QUEUE_ORDERS:
            raise ValueError(f"unknown queue order {order!r} (known: {', '.join(QUEUE_ORDERS)})")
        if not aging_s > 0 or math.isinf(aging_s):
            raise ValueError(f"aging_s must be a finite number > 0, got {aging_s!r}")
        self.order = order
        self.aging_s = float(aging_s)
        self._edf = order == "edf"
        # Every row is in exactly one of these two: `_sorted` while pushes come in rank
        # order (appended at its end), `_heap` for the rows that came out of order.
        self._sorted: deque[_Row[T]] = deque()
        self._heap: list[_Row[T]] = []
        self._by_key: dict[Hashable, list[_Row[T]]] = {}  # keyed rows, again, per key
        self._seq = 0
        self._live = 0

    # -- adding and removing -------------------------------------------------------
    def push(
        self, item: T, *, arrival: float, deadline: float | None = None, key: Hashable = None
    ) -> None:
        if self._edf:
            aged = arrival + self.aging_s
            rank = aged if deadline is None or deadline > aged else deadline
        else:
            rank = arrival
        row = (rank, self._seq, _Entry(item, key))
        self._seq += 1
        tail = self._sorted
        if not tail or rank >= tail[-1][0]:
            tail.append(row)
        else:
            heapq.heappush(self._heap, row)
        if key is not None:
            heap = self._by_key.get(key)
            if heap is None:
                self._by_key[key] = [row]
            else:
                heapq.heappush(heap, row)
        self._live += 1

    def remove(self, item: T) -> bool:
        """Take `item` (by identity; its earliest push) out; False when it is not queued."""
        found = [row for row in self._rows() if row[2].live and row[2].item is item]
        if not found:
            return False
        min(found)[2].live = False
        self._live -= 1
        if len(self._sorted) + len(self._heap) > max(64, 3 * self._live):
            self._rebuild()
        return True

    # -- serving -------------------------------------------------------------------
    def pop_batch(self, max_batch: int = 1) -> list[T]:
        """The head and up to `max_batch` - 1 later items with its key, in order; [] when empty."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        tail, heap, pop = self._sorted, self._heap, heapq.heappop
        while True:
            if tail and (not heap or tail[0] < heap[0]):
                head = tail.popleft()[2]
            elif heap:
                head = pop(heap)[2]
            else:
                return []
            if head.live:
                break
        head.live = False
        out = [head.item]
        key = head.key
        if key is not None:
            same = self._by_key[key]
            while same and len(out) < max_batch:
                entry = pop(same)[2]
                if entry.live:
                    entry.live = False
                    out.append(entry.item)
            while same and not same[0][2].live:  # the head itself, and others served
                pop(same)
            if not same:
                del self._by_key[key]
        self._live -= len(out)
        return out

    def pop(self) -> T:
        """The head alone; IndexError when empty."""
        batch = self.pop_batch(1)
        if not batch:
            raise IndexError("pop from an empty OrderedQueue")
        return batch[0]

    def head(self) -> T:
        """The next head without taking it; IndexError when empty."""
        return self._head_row()[2].item

    def head_key(self) -> Hashable:
        """The key of the next head; IndexError when empty."""
        return self._head_row()[2].key

    def _head_row(self) -> _Row[T]:
        tail, heap = self._sorted, self._heap
        while tail and not tail[0][2].live:
            tail.popleft()
        while heap and not heap[0][2].live:
            heapq.heappop(heap)
        if not tail and not heap:
            raise IndexError("head of an empty OrderedQueue")
        return tail[0] if tail and (not heap or tail[0] < heap[0]) else heap[0]

    def __len__(self) -> int:
        return self._live

    def __bool__(self) -> bool:
        return self._live > 0

    def __iter__(self) -> Iterator[T]:
        """The items in the order `pop` would return them."""
        return iter([row[2].item for row in sorted(self._rows()) if row[2].live])

    # -- lazy deletion -------------------------------------------------------------
    def _rows(self) -> list[_Row[T]]:
        return [*self._sorted, *self._heap]

    def _rebuild(self) -> None:
        """Drop dead rows everywhere (after many removals)."""
        self._sorted = deque(row for row in self._sorted if row[2].live)
        self._heap = [row for row in self._heap if row[2].live]
        heapq.heapify(self._heap)
        for key in list(self._by_key):
            rows = [row for row in self._by_key[key] if row[2].live]
            if rows:
                heapq.heapify(rows)
                self._by_key[key] = rows
            else:
                del self._by_key[key]
