"""How many instances a stage needs for a load (pure queueing arithmetic).

Each stage is a pool of identical servers fed by one work-conserving queue,
i.e. roughly M/G/c. A fixed utilization target is wrong at both ends: one
or two servers at 80 % queue for long, while a pool of a hundred can run at
97 % with almost no wait. So the size is the smallest pool whose mean wait
(Erlang C) stays within a budget, and whose utilization stays under a cap.
With batching (`batched_servers_for`), fewer instances that each run several
requests per call may carry the same load, if the SLO can absorb the longer calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from disagfusion.scheduling.profile import BatchTerm, batch_at_rate, batch_capacity, batch_factor


def servers_for(
    arrival_rps: float,
    service_time_s: float,
    max_wait_s: float,
    max_utilization: float = 0.95,
    limit: int = 100_000,
) -> int:
    """The fewest servers that keep mean wait <= max_wait_s and busy share <= max_utilization."""
    load = max(0.0, arrival_rps) * max(0.0, service_time_s)
    if load <= 0:
        return 0
    start = max(1, math.ceil(load / max(max_utilization, 1e-6) - 1e-9))
    blocking = 1.0
    for k in range(1, min(start, limit) + 1):
        blocking = load * blocking / (k + load * blocking)
    servers = min(start, limit)
    while servers < limit:
        if servers > load:
            rho = load / servers
            wait = blocking / (1 - rho * (1 - blocking)) * service_time_s / (servers - load)
            if wait <= max_wait_s:
                return servers
        servers += 1
        blocking = load * blocking / (servers + load * blocking)
    return limit


# A request that joins a batching instance waits, on average, for half of the
# batch running now (the next batch collects while it runs), then for the whole
# of its own batch: 1.5·t(B) in the stage, against t(1) when it runs alone.
BATCH_RESIDUAL_SHARE = 0.5


@dataclass(frozen=True)
class Pool:
    """A stage's size for a load, and the batch its instances settle at."""

    servers: int
    batch: int  # requests per call at this load (1: every request alone)
    seconds_per_request: float  # instance-seconds one request costs: t(B)/B


def batched_servers_for(
    arrival_rps: float,
    service_time_s: float,
    max_wait_s: float,
    max_utilization: float = 0.95,
    term: BatchTerm = (),
    max_batch: int = 1,
    limit: int = 100_000,
) -> Pool:
    """The fewest servers for the load when an instance may run up to `max_batch`
    requests per call.

    n instances each see λ/n and settle at batch B = batch_at_rate(λ/n): batches
    only form where one instance cannot keep up alone, so n < λ·t(1). Such a pool
    is taken when it keeps up, still has `max_utilization` headroom against its
    largest batch's rate, and the delay batching adds (1.5·t(B) - t(1), see
    BATCH_RESIDUAL_SHARE) fits `max_wait_s`; otherwise the pool is
    `servers_for`'s, at batch 1. All three conditions only loosen as n grows, so
    the fewest is found by bisection. No term or max_batch 1: `servers_for` exactly.
    """
    alone = Pool(
        servers_for(arrival_rps, service_time_s, max_wait_s, max_utilization, limit),
        1,
        service_time_s,
    )
    if max_batch <= 1 or not term or arrival_rps <= 0 or service_time_s <= 0:
        return alone
    headroom = max_utilization * batch_capacity(service_time_s, term, max_batch)[0]

    def batched(n: int) -> Pool | None:
        per_instance = arrival_rps / n
        size = batch_at_rate(per_instance, service_time_s, term, max_batch)
        batch_s = service_time_s * batch_factor(term, size)
        added = (1 + BATCH_RESIDUAL_SHARE) * batch_s - service_time_s
        if (
            size < 2
            or per_instance * batch_s > size * (1 + 1e-9)  # overloaded even at max_batch
            or per_instance > headroom
            or added > max_wait_s
        ):
            return None
        return Pool(n, size, batch_s / size)

    # Batches form only below λ·t(1) instances; fewer than `alone` or there is no gain.
    high = min(alone.servers - 1, math.ceil(arrival_rps * service_time_s) - 1)
    while high >= 1 and batch_at_rate(arrival_rps / high, service_time_s, term, max_batch) < 2:
        high -= 1  # float rounding at the boundary
    best = batched(high) if high >= 1 else None
    if best is None:
        return alone
    low = 1  # invariant: batched(high) holds; find the fewest in [low, high]
    while low < high:
        mid = (low + high) // 2
        pool = batched(mid)
        if pool is None:
            low = mid + 1
        else:
            high, best = mid, pool
    return best


def servers_for_tail(
    arrival_rps: float,
    service_time_s: float,
    max_wait_s: float,
    miss_share: float,
    length_bias: float = 1.0,
    limit: int = 100_000,
) -> int:
    """The fewest servers with P(a short request waits > max_wait_s) <= miss_share.

    The mean wait hides the requests whose slack is shorter than a wait: a
    one-second request behind a pool of four-minute ones misses whenever it
    finds every server busy. It waits with the Erlang C probability (a = λ·S),
    and is served first (earliest deadline first), so then only until the
    first of the c busy servers frees. The requests found in service are the
    long ones: their mean is length_bias·S, with length_bias = E[t²]/E[t]² =
    1 + cv² of the service time over the mix. With fixed-length requests at
    spread-out phases the first frees after that over c, about exponentially:
    P(wait > x | wait) ≈ exp(-x·c / (length_bias·S)).
    """
    if not 0 < miss_share <= 1:
        raise ValueError(f"miss_share must be in (0, 1], got {miss_share}")
    load = max(0.0, arrival_rps) * max(0.0, service_time_s)
    if load <= 0:
        return 0
    servers = max(1, math.floor(load) + 1)
    blocking = 1.0  # Erlang B, by the recursion B(k) = a·B(k-1) / (k + a·B(k-1))
    for k in range(1, min(servers, limit) + 1):
        blocking = load * blocking / (k + load * blocking)
    in_service = max(length_bias, 1e-9) * service_time_s
    while servers < limit:
        rho = load / servers
        waits = blocking / (1 - rho * (1 - blocking))  # Erlang C
        if waits * math.exp(-max(0.0, max_wait_s) * servers / in_service) <= miss_share:
            return servers
        servers += 1
        blocking = load * blocking / (servers + load * blocking)
    return limit
