"""The arrival rate ahead: a trend through recent windowed rates (pure).

The hybrid policy sizes for the rate it will see when a pod it starts now
is ready. Each point is already a windowed rate; a least-squares line
through the last minutes removes most of the sampling noise (which would
otherwise size the stages for noise peaks) without the lag of a plain
average. A long fit gives the steady level, a short one catches a ramp early.
"""

from __future__ import annotations

import math

RatePoints = tuple[tuple[float, float], ...]  # (time, arrival rate), oldest first
TRENDS_KEPT_S = 600.0
SHORT_TREND_S = 180.0
RISE_Z = 3.0  # standard errors a rise must clear to count as a ramp
JUMP_Z = 2.0  # Poisson standard deviations a new rate must clear to count as a jump
RATE_WINDOW_S = 60.0  # the window the arrival rate is measured over (rate()[1m])


def rate_history(previous: RatePoints, now: float, rate: float) -> RatePoints:
    """The points the trend is fitted to: the last TRENDS_KEPT_S seconds, then this one."""
    return (*((t, r) for t, r in previous if now - t <= TRENDS_KEPT_S), (now, rate))


def trend(points: RatePoints, now: float) -> tuple[float, float]:
    """The arrival rate now and its rise (req/s per s), by least squares over `points`.

    The rise counts only beyond RISE_Z standard errors, so noise is not
    mistaken for a ramp.
    """
    n = len(points)
    if n < 4 or points[-1][0] - points[0][0] <= 0:
        return points[-1][1], 0.0
    mt = sum(t for t, _ in points) / n
    mr = sum(r for _, r in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    slope = sum((t - mt) * (r - mr) for t, r in points) / var
    intercept = mr - slope * mt
    residual = sum((r - intercept - slope * t) ** 2 for t, r in points) / (n - 2)
    rise = max(0.0, slope - RISE_Z * math.sqrt(residual / var))
    # A step the line has not caught up with yet (either way): keep the level within
    # the sampling noise of the newest windowed Poisson count.
    fitted = mr + slope * (now - mt)
    newest = points[-1][1]
    noise = JUMP_Z * math.sqrt(max(fitted, newest, 0.0) / RATE_WINDOW_S)
    level = min(max(fitted, newest - noise), newest + noise)
    return max(0.0, level), rise


def forecast(points: RatePoints, now: float, horizon_s: float) -> tuple[float, float]:
    """(the rate `horizon_s` ahead, the rise it adds to the level: > 0 while a ramp is on)."""
    level, rise = trend(points, now)
    _, short_rise = trend(tuple(p for p in points if now - p[0] <= SHORT_TREND_S), now)
    ramp = max(rise, short_rise) * horizon_s
    return level + ramp, ramp
