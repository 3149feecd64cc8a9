"""Request traces: JSONL files, one request a line (pure parsing).

    {"t": seconds, "width": px, "height": px, "frames": n, "steps": n}

`t` is the arrival time in seconds from the start of the trace; lines must
be in time order. Missing shape fields take the profile's default request.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from disagfusion.operator.profile import RequestShape


class TraceError(ValueError):
    """A trace line that cannot be used; the message names the line."""


@dataclass(frozen=True)
class TraceRequest:
    t: float
    shape: RequestShape


def parse_trace_lines(lines: Iterable[str], default: RequestShape) -> list[TraceRequest]:
    """Parse JSONL lines; blank lines are skipped. TraceError names the first bad line."""
    out: list[TraceRequest] = []
    last_t = 0.0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TraceError(f"line {number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise TraceError(f"line {number}: must be a JSON object")
        t = row.get("t")
        if isinstance(t, bool) or not isinstance(t, int | float) or t < 0 or t != t:
            raise TraceError(f"line {number}: 't' must be a number of seconds >= 0")
        if t < last_t:
            raise TraceError(f"line {number}: t={t} is before the previous line's t={last_t}")
        unknown = sorted(set(row) - {"t", "width", "height", "frames", "steps"})
        if unknown:
            raise TraceError(f"line {number}: unknown field(s) {', '.join(unknown)}")
        fields = {}
        for key in ("width", "height", "frames", "steps"):
            value = row.get(key, getattr(default, key))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TraceError(f"line {number}: {key!r} must be an integer >= 1, got {value!r}")
            fields[key] = value
        out.append(TraceRequest(float(t), RequestShape(**fields)))
        last_t = float(t)
    return out


def trace_to_lines(requests: Iterable[TraceRequest]) -> Iterable[str]:
    for r in requests:
        s = r.shape
        yield json.dumps(
            {
                "t": round(r.t, 6),
                "width": s.width,
                "height": s.height,
                "frames": s.frames,
                "steps": s.steps,
            }
        )


def shape_mix(requests: Iterable[TraceRequest]) -> tuple[tuple[RequestShape, float], ...]:
    """Each distinct shape with its share of the requests, most common first."""
    counts = Counter(r.shape for r in requests)
    total = sum(counts.values())
    if not total:
        return ()
    return tuple((shape, n / total) for shape, n in counts.most_common())
