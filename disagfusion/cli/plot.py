"""PNG of simulation results, one row per policy: instances per stage over time with
the arrival rate on a second axis (left), request latency with a rolling p95 and
the SLO line (right). `build_figure` is pure; `plot_results` writes the file."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from disagfusion.scheduling.sim.simulate import SimResult, timeline_of

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_POINTS = 20_000  # latency dots drawn per policy (evenly thinned beyond this)
RATE_BINS = 120  # arrival-rate bins over the trace
MARKERS_PER_LINE = 12  # per pool, offset from the other pools' so overlapping lines show
ROW_INCHES = 2.9
WIDTH_INCHES = 13.0
WIDTH_RATIOS = (1.4, 1.0)  # instances (with arrivals and a longer legend) | latency
HEADROOM = 4.0  # axis top over the highest line (log scales): room for the legend
DPI = 100
# Distinct colour, line style and marker per pool: equal counts stay visible.
POOL_STYLE: dict[str, dict[str, Any]] = {
    "encoder": {"color": "tab:blue", "linestyle": "-", "marker": "o", "linewidth": 2.4},
    "denoiser": {"color": "tab:orange", "linestyle": "-", "marker": "s", "linewidth": 1.6},
    "decoder": {"color": "tab:green", "linestyle": "--", "marker": "^", "linewidth": 1.4},
    "monolithic": {"color": "tab:purple", "linestyle": "-", "marker": "D", "linewidth": 1.6},
}


@dataclass(frozen=True)
class PlotContext:
    """What the results alone do not say."""

    title: str = ""
    arrivals: Sequence[float] = ()  # arrival time (s) of every trace request
    slo_s: float | None = None  # latency SLO line in seconds; None: no line
    slo_label: str = "SLO"
    # policy -> pool -> accelerator types it ran on; named in the legend when given
    # (heterogeneous profiles), e.g. "denoiser (H100)"
    accelerators: Mapping[str, Mapping[str, Sequence[str]]] = field(default_factory=dict)


def plain(value: float, _pos: object = None) -> str:
    """A tick label without exponent or offset: 0.5, 20, 10000."""
    if value == int(value):
        return f"{int(value)}"
    return f"{value:.6f}".rstrip("0").rstrip(".")


def time_unit(duration_s: float) -> tuple[float, str]:
    """(seconds per unit, axis label): minutes for traces under two hours."""
    return (60.0, "minutes") if duration_s < 2 * 3600 else (3600.0, "hours")


def pool_label(pool: str, accelerators: Sequence[str] = ()) -> str:
    """`denoiser`, or `denoiser (H100)`; a pool moved between types: `(H100→L40S)`."""
    return f"{pool} ({'→'.join(accelerators)})" if accelerators else pool


def rolling_p95(
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


def arrival_rate(
    arrivals: Sequence[float], end_s: float, bins: int = RATE_BINS
) -> tuple[list[float], list[float]]:
    """(bin start times, requests/s in each bin) over [0, end_s]."""
    if not arrivals or end_s <= 0:
        return [], []
    width = end_s / bins
    counts = [0] * bins
    for t in arrivals:
        counts[min(bins - 1, max(0, int(t / width)))] += 1
    return [i * width for i in range(bins)], [c / width for c in counts]


def build_figure(results: Sequence[SimResult], context: PlotContext | None = None) -> Figure:
    from matplotlib.figure import Figure

    ctx = context or PlotContext()
    rows = max(1, len(results))
    fig = Figure(figsize=(WIDTH_INCHES, ROW_INCHES * rows + 0.6), layout="constrained")
    axes = fig.subplots(
        rows, 2, squeeze=False, sharex=True, gridspec_kw={"width_ratios": WIDTH_RATIOS}
    )
    end = max([r.duration_s for r in results] + list(ctx.arrivals[-1:]) + [1.0])
    scale, unit = time_unit(end)
    rate = arrival_rate(ctx.arrivals, end)
    worst = max((max(r.latencies) for r in results if r.latencies), default=1.0)
    most = max((max(c) for r in results for _, c in r.timeline), default=1)  # same y per row
    for row, r in enumerate(results):
        left, right = axes[row]
        _instances(left, r, ctx.accelerators.get(r.policy, {}), rate, scale, most)
        _latency(right, r, ctx, scale, worst)
    for ax in axes[-1]:
        ax.set_xlabel(unit)
        ax.set_xlim(0, end / scale)
    if ctx.title:
        fig.suptitle(ctx.title)
    return fig


def _instances(
    ax: Axes,
    r: SimResult,
    accelerators: Mapping[str, Sequence[str]],
    rate: tuple[list[float], list[float]],
    scale: float,
    most: int,
) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator, SymmetricalLogLocator

    twin = _arrivals(ax, rate, scale) if rate[0] else None
    handles = _pool_lines(ax, r, accelerators, scale)
    # symlog: 1 encoder and 60 denoisers both readable, and 0 still drawable
    ax.set_yscale("symlog", linthresh=2, linscale=0.6)
    ax.set_ylim(0, max(1, most) * HEADROOM)
    ax.yaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=2, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(plain))
    ax.xaxis.set_major_formatter(FuncFormatter(plain))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))
    ax.set_ylabel("instances")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(_row_title(r), loc="left", fontsize="medium", fontweight="bold")
    if twin is not None:
        handles += twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize="small", loc="upper left", ncol=2, framealpha=0.85)


def _pool_lines(
    ax: Axes, r: SimResult, accelerators: Mapping[str, Sequence[str]], scale: float
) -> list[Any]:
    """A step line per pool, with its markers at its own evenly spaced times (pools with
    equal counts, often 1 encoder and 1 decoder, stay apart); the legend handles."""
    from matplotlib.lines import Line2D

    pools = timeline_of(r)
    end = r.duration_s / scale
    handles: list[Any] = []
    for i, (name, points) in enumerate(pools.items()):
        if not points:
            continue
        xs = [t / scale for t, _ in points] + [end]
        ys = [n for _, n in points] + [points[-1][1]]
        style = POOL_STYLE.get(name, {"color": "black", "linestyle": "-", "marker": "x"})
        line = {k: v for k, v in style.items() if k != "marker"}
        ax.step(xs, ys, where="post", **line)
        shift = (i + 1) / (len(pools) + 1)
        at = [(k + shift) * end / MARKERS_PER_LINE for k in range(MARKERS_PER_LINE)]
        ax.plot(
            at,
            step_values(xs, ys, at),
            linestyle="none",
            marker=style["marker"],
            color=style["color"],
            markersize=5,
        )
        label = pool_label(name, accelerators.get(name, ()))
        handles.append(Line2D([], [], label=label, markersize=5, **style))
    return handles


def step_values(xs: Sequence[float], ys: Sequence[float], at: Sequence[float]) -> list[float]:
    """The post-step function through (xs, ys) at the times `at` (xs ascending)."""
    return [ys[max(0, bisect.bisect_right(xs, x) - 1)] for x in at]


def _row_title(r: SimResult) -> str:
    attained = r.summary()["slo_attainment"]
    if attained is None:
        return r.policy
    return (
        f"{r.policy}: SLO met {attained:.1%}, {r.gpu_hours:,.1f} GPU-h, "
        f"{r.scale_events} scale events"
    )


def _arrivals(ax: Axes, rate: tuple[list[float], list[float]], scale: float) -> Axes:
    """The offered load on a right-hand axis, drawn under the instance lines."""
    from matplotlib.ticker import FuncFormatter

    twin = ax.twinx()
    xs = [t / scale for t in rate[0]]
    twin.fill_between(
        xs, rate[1], step="post", color="0.6", alpha=0.3, linewidth=0, label="arrivals (req/s)"
    )
    twin.set_ylim(bottom=0, top=max(rate[1]) * 1.3 or 1.0)
    twin.set_ylabel("arrivals (req/s)", color="0.35")
    twin.tick_params(axis="y", colors="0.35")
    twin.yaxis.set_major_formatter(FuncFormatter(plain))
    ax.set_zorder(twin.get_zorder() + 1)  # lines in front of the shaded load
    ax.patch.set_visible(False)
    return twin


def _latency(ax: Axes, r: SimResult, ctx: PlotContext, scale: float, worst: float) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    step = max(1, len(r.done_times) // MAX_POINTS)
    xs = [t / scale for t in r.done_times[::step]]
    ax.scatter(xs, r.latencies[::step], s=3, alpha=0.25, color="tab:blue", label="request")
    px, py = rolling_p95(r.done_times, r.latencies)
    ax.plot([x / scale for x in px], py, color="tab:red", linewidth=1.6, label="p95")
    if ctx.slo_s is not None:
        ax.axhline(ctx.slo_s, color="black", linestyle="--", linewidth=1.2, label=ctx.slo_label)
    ax.set_yscale("log")
    low = min(r.latencies, default=1.0)
    if ctx.slo_s is not None:
        worst, low = max(worst, ctx.slo_s), min(low, ctx.slo_s)
    ax.set_ylim(low / 1.5, worst * HEADROOM)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(plain))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(plain))
    ax.set_ylabel("latency (s)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", ncol=3, framealpha=0.85, markerscale=3)


def plot_results(
    results: Sequence[SimResult], path: Path, context: PlotContext | None = None
) -> None:
    """Write `build_figure`'s PNG to `path` (OSError if it cannot be written)."""
    build_figure(results, context).savefig(path, dpi=DPI)
