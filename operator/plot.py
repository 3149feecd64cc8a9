"""PNG of simulation results: one column per policy; instances per stage over time on top,
request latency (each completion, and a rolling p95) below. Writes a file (I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from disagfusion.operator.simulate import SimResult, timeline_of

MAX_POINTS = 20_000  # latency dots drawn per policy (evenly thinned beyond this)


def _rolling_p95(
    times: Sequence[float], values: Sequence[float], bins: int = 200
) -> tuple[list[float], list[float]]:
    if not times:
        return [], []
    lo, hi = times[0], times[-1]
    width = max((hi - lo) / bins, 1e-9)
    buckets: list[list[float]] = [[] for _ in range(bins + 1)]
    for t, v in zip(times, values, strict=True):
        buckets[int((t - lo) / width)].append(v)
    xs, ys = [], []
    for i, b in enumerate(buckets):
        if b:
            b.sort()
            xs.append(lo + (i + 0.5) * width)
            ys.append(b[min(len(b) - 1, int(0.95 * len(b)))])
    return xs, ys


def plot_results(results: Sequence[SimResult], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    cols = max(1, len(results))
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 6.5), squeeze=False, sharex="col")
    top = max((max(c) for r in results for _, c in r.timeline), default=1)
    worst = max((max(r.latencies) for r in results if r.latencies), default=1.0)
    for col, r in enumerate(results):
        up, down = axes[0][col], axes[1][col]
        for name, points in timeline_of(r).items():
            if points:
                hours = [t / 3600 for t, _ in points]
                up.step(hours, [n for _, n in points], where="post", label=name, linewidth=1)
        up.set_title(r.policy)
        up.set_ylim(0, top * 1.05)
        up.set_ylabel("instances" if col == 0 else "")
        up.legend(fontsize="x-small", loc="upper left")
        step = max(1, len(r.done_times) // MAX_POINTS)
        hours = [t / 3600 for t in r.done_times[::step]]
        down.scatter(hours, r.latencies[::step], s=1, alpha=0.3, label="request")
        xs, ys = _rolling_p95(r.done_times, r.latencies)
        down.plot([x / 3600 for x in xs], ys, color="C3", linewidth=1, label="p95")
        down.set_yscale("log")
        down.set_ylim(top=worst * 1.5)
        down.set_xlabel("hours")
        down.set_ylabel("latency (s)" if col == 0 else "")
        down.legend(fontsize="x-small", loc="upper left")
    if title:
        fig.suptitle(title, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
