"""Order statistics shared by the benchmark and the simulator (pure)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentiles(values: Iterable[float], qs: Sequence[float]) -> list[float]:
    """Nearest-rank percentiles (each q in 0..100) of `values`, sorted once; NaN for none."""
    ordered = sorted(values)
    if not ordered:
        return [math.nan for _ in qs]
    n = len(ordered)
    return [ordered[max(1, min(n, math.ceil(q / 100 * n))) - 1] for q in qs]


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    return percentiles(values, (q,))[0]
