"""The shared nearest-rank percentile."""

from __future__ import annotations

import math

from disagfusion.scheduling.stats import percentile, percentiles


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 50) == 50
    assert percentile(values, 95) == 95
    assert percentile(values, 100) == 100
    assert percentile(values, 0) == 1  # the smallest, never an index below it
    assert percentile([7.0], 95) == 7
    assert math.isnan(percentile([], 50))


def test_percentiles_sort_once_for_several_ranks() -> None:
    assert percentiles([3.0, 1.0, 2.0], (50, 100)) == [2.0, 3.0]
    assert all(math.isnan(x) for x in percentiles([], (50, 99)))
