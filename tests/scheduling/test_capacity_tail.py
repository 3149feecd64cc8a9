"""capacity.servers_for_tail: the fewest servers that keep P(wait > x) small."""

from __future__ import annotations

import math

import pytest

from disagfusion.scheduling.capacity import servers_for, servers_for_tail


def erlang_c(servers: int, load: float) -> float:
    """Erlang C by its closed form (the test's own, independent of the recursion)."""
    top = load**servers / math.factorial(servers) * servers / (servers - load)
    return top / (sum(load**k / math.factorial(k) for k in range(servers)) + top)


def tail(servers: int, rate: float, t: float, x: float, length_bias: float) -> float:
    load = rate * t
    return erlang_c(servers, load) * math.exp(-x * servers / (length_bias * t))


@pytest.mark.parametrize(
    ("rate", "t", "x", "miss", "length_bias"),
    [(1.34, 38.0, 1.6, 0.003, 6.6), (1.3, 0.9, 1.6, 0.002, 1.0), (2.0, 10.0, 5.0, 0.01, 2.0)],
)
def test_it_is_the_fewest_servers_within_the_miss_share(
    rate: float, t: float, x: float, miss: float, length_bias: float
) -> None:
    n = servers_for_tail(rate, t, x, miss, length_bias)
    assert n > rate * t
    assert tail(n, rate, t, x, length_bias) <= miss
    if n - 1 > rate * t:
        assert tail(n - 1, rate, t, x, length_bias) > miss


def test_a_short_deadline_behind_long_requests_needs_more_than_the_mean_wait() -> None:
    # 15 % of 1.34 req/s take 253 s, the rest a blink: 38 s on average, and the
    # requests in service average 253 s (length bias 6.6). A mean wait of 10 s is
    # cheap; a 1.6 s deadline for the short ones is not.
    mean_pool = servers_for(1.34, 38.0, 10.0, 1.0)
    assert servers_for_tail(1.34, 38.0, 1.6, 0.003, 6.6) > mean_pool + 10


def test_more_room_or_more_misses_need_fewer_servers() -> None:
    base = servers_for_tail(1.0, 40.0, 2.0, 0.002, 3.0)
    assert servers_for_tail(1.0, 40.0, 200.0, 0.002, 3.0) < base
    assert servers_for_tail(1.0, 40.0, 2.0, 0.05, 3.0) < base
    assert servers_for_tail(1.0, 40.0, 2.0, 0.002, 30.0) > base  # longer ones in service


def test_no_load_needs_no_server_and_a_bad_share_is_named() -> None:
    assert servers_for_tail(0.0, 10.0, 1.0, 0.01) == 0
    with pytest.raises(ValueError, match="miss_share"):
        servers_for_tail(1.0, 10.0, 1.0, 0.0)
