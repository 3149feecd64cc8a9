"""The short requests of a mix under a slowdown SLO (pure; used by the hybrid policy).

A slowdown SLO gives a light request little slack while a heavy one holds an
instance for long, and service is not preemptive: a mean-wait budget sized for
the whole mix hides that the light requests miss whenever they find every
instance busy. These are the pieces that size for them: which requests are
the short ones, how variable a stage's service time is over the mix, and how
long a short request may wait at each stage (capacity.servers_for_tail turns
that into a pool size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from disagfusion.scheduling.planner import slo_slack
from disagfusion.scheduling.profile import Profile, RequestShape
from disagfusion.scheduling.scaling import Knobs
from disagfusion.scheduling.stages import STAGES

Mix = tuple[tuple[RequestShape, float], ...]
SLO_TARGET = 0.99
WAIT_SHARE = 0.2  # the hybrid policy's share of the slack the mean queueing wait may use
SHORT_SHARE = 0.05  # the short requests: the fastest shapes that make up this share of the mix
TAIL_MISS_SHARE = (1 - SLO_TARGET) / len(STAGES)  # short requests one stage may make miss


@dataclass(frozen=True)
class Tail:
    """The short requests' deadline at one stage: P(wait > max_wait_s) <= miss_share.

    `length_bias` is E[t²]/E[t]² = 1 + cv² of the stage's service time over the mix."""

    max_wait_s: float = math.inf  # inf: no tail condition
    length_bias: float = 1.0
    miss_share: float = TAIL_MISS_SHARE


NO_TAIL = Tail()


def short_shape(profile: Profile, accs: Mapping[str, str], mix: Mix) -> RequestShape:
    """The mix's short requests: the fastest shape, unloaded, once the shapes taken
    fastest first make up SHORT_SHARE of the mix (its 5th percentile)."""
    ordered = sorted(mix, key=lambda sw: profile.unloaded_latency(sw[0], accs))
    total, seen = sum(w for _, w in ordered), 0.0
    for shape, w in ordered:
        seen += w
        if seen >= SHORT_SHARE * total:
            return shape
    return ordered[-1][0]


def service_cv2(profile: Profile, accs: Mapping[str, str], mix: Mix) -> dict[str, float]:
    """Per stage, the squared coefficient of variation of the service time over the mix
    (0 for one shape: the profile's times carry no noise)."""
    total = sum(w for _, w in mix)
    out = {}
    for s in STAGES:
        times = [(profile.service_time(s, accs[s], shape), w / total) for shape, w in mix]
        mean = sum(t * w for t, w in times)
        second = sum(t * t * w for t, w in times)
        out[s] = max(0.0, second / (mean * mean) - 1) if mean > 0 else 0.0
    return out


def tail_rules(
    profile: Profile,
    knobs: Knobs,
    mix: Mix,
    accs: Mapping[str, str],
    cv2: Mapping[str, float],
    wait_share: float = WAIT_SHARE,
) -> dict[str, Tail]:
    """Per stage, how long a short request may wait there: what its slack leaves after
    the other stages' mean waits (the `wait_share` of it), so one long wait misses.

    Only where the short requests have less slack than the mean request (a slowdown
    SLO over a mix of shapes): otherwise the mean-wait budget already speaks for them."""
    slo = profile.slo_or_default(knobs.slo)
    shape = short_shape(profile, accs, mix)
    slack, _ = slo_slack(profile, accs, ((shape, 1.0),), slo)
    if slack >= slo_slack(profile, accs, mix, slo)[0]:
        return dict.fromkeys(STAGES, NO_TAIL)
    allowed = (1 - wait_share) * max(slack, 0.0)
    return {s: Tail(max_wait_s=allowed, length_bias=1 + cv2[s]) for s in STAGES}
