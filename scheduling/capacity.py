"""How many instances a stage needs for a load (pure queueing arithmetic).

Each stage is a pool of identical servers fed by one work-conserving queue,
i.e. roughly M/G/c. A fixed utilization target is wrong at both ends: one
or two servers at 80 % queue for long, while a pool of a hundred can run at
97 % with almost no wait. So the size is the smallest pool whose mean wait
(Erlang C) stays within a budget, and whose utilization stays under a cap.
"""

from __future__ import annotations

import math


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
