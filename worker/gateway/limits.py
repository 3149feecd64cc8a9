"""What one client may ask of the gateway's HTTP server, and the middleware that says no.

* Body size: aiohttp's ``client_max_size``; a larger body is a JSON 413 (at once
  when its ``Content-Length`` says so, else when a handler reads past the limit).
* Header size and count: aiohttp's parser limits (``max_line_size``,
  ``max_field_size``, ``max_headers``). A request over them is never parsed, so
  it never reaches the app: aiohttp itself answers 400 ``text/plain`` naming
  the limit ("Got more than 8190 bytes when reading ...", "Too many headers
  received") and closes the connection.
* Requests in flight: at most ``max_in_flight`` HTTP requests are served at
  once (probes aside); more get a JSON 503 with ``Retry-After``. The bound is on
  requests, not sockets: an idle keep-alive connection costs a file descriptor
  only, and aiohttp closes it after its keep-alive timeout (75 s).
* Request rate: a token bucket per client (``burst`` requests at once, then
  ``rate_per_s``); an empty bucket is a JSON 429 with ``Retry-After``. The
  client is the API key when the request carries the gateway's key, else the
  peer's IP address (behind a proxy: the proxy's), so made-up keys share their
  sender's bucket instead of each getting a fresh one.

Probes (/healthz, /readyz, /metrics) are exempt from the rate and in-flight
limits: kubelets and Prometheus poll them from few addresses.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from disagfusion.worker.gateway.api import error_body

if TYPE_CHECKING:  # aiohttp is imported where it is used: the CLI flags need none
    from aiohttp import web
    from aiohttp.typedefs import Middleware

__all__ = [
    "PROBE_PATHS",
    "GatewayLimits",
    "RateLimiter",
    "TokenBucket",
    "add_limit_arguments",
    "client_identity",
    "limits_from_args",
    "limits_middleware",
    "too_large",
]

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
IMAGE_BODY_MIB = 1
VIDEO_BODY_MIB = 32  # a video job's reference image arrives in the body

Clock = Callable[[], float]
Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


@dataclass(frozen=True, kw_only=True)
class GatewayLimits:
    """The gateway's HTTP limits. The defaults apply wherever none are given."""

    max_body_mib: int | None = None  # None: 1 MiB, or 32 MiB for a video model
    max_header_count: int = 100
    max_header_line_bytes: int = 8190  # the request line and each header line
    max_in_flight: int = 256  # HTTP requests served at once (probes aside) before 503
    rate_per_s: float = 20.0  # requests per second per client; 0: no rate limit
    burst: int = 100  # requests a client may send at once
    max_clients: int = 10_000  # buckets remembered; the least recently seen are dropped

    def __post_init__(self) -> None:
        problems = []
        if self.max_body_mib is not None and self.max_body_mib < 1:
            problems.append(f"max_body_mib must be >= 1, got {self.max_body_mib}")
        for name in ("max_header_count", "max_in_flight", "burst", "max_clients"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_header_line_bytes < 256:
            problems.append(
                f"max_header_line_bytes must be >= 256, got {self.max_header_line_bytes}"
            )
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s >= 0):
            problems.append(f"rate_per_s must be a finite number >= 0, got {self.rate_per_s}")
        if problems:
            raise ValueError("invalid GatewayLimits: " + "; ".join(problems))

    def body_bytes(self, video: bool) -> int:
        mib = self.max_body_mib or (VIDEO_BODY_MIB if video else IMAGE_BODY_MIB)
        return mib << 20

    def handler_args(self) -> dict[str, int]:
        """aiohttp's parser limits, for ``web.Application(handler_args=...)``."""
        return {
            "max_line_size": self.max_header_line_bytes,
            "max_field_size": self.max_header_line_bytes,
            "max_headers": self.max_header_count,
        }


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; a request spends one."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 when a token was spent; else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per client, at most ``max_clients`` of them (LRU)."""

    def __init__(
        self, rate: float, burst: int, max_clients: int, clock: Clock = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def check(self, client: str) -> float:
        """0.0: admitted; else the seconds ``client`` should wait (nothing is spent)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket(self.rate, self.burst, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)


def client_identity(request: web.Request, api_key: str | None) -> str:
    """The API key (hashed) when the request carries the gateway's key, else the peer IP."""
    if api_key:
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
    return "ip:" + (request.remote or "unknown")


def _json_error(
    status: int, message: str, code: str, kind: str, retry_after_s: float | None = None
) -> web.Response:
    from aiohttp import web

    headers = None
    if retry_after_s is not None:
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
    return web.json_response(
        error_body(message, code=code, kind=kind), status=status, headers=headers
    )


def too_large(request: web.Request) -> web.Response:
    """The JSON 413 for a body over ``client_max_size``."""
    limit = request.client_max_size
    return _json_error(
        413,
        f"The request body is larger than this server's limit of {limit} bytes "
        f"({limit / (1 << 20):g} MiB).",
        "too_large",
        "invalid_request_error",
    )


def limits_middleware(
    limits: GatewayLimits, *, api_key: str | None = None, clock: Clock = time.monotonic
) -> Middleware:
    """Rate, in-flight and announced-body-size limits, in that order."""
    from aiohttp import web

    limiter = RateLimiter(limits.rate_per_s, limits.burst, limits.max_clients, clock)
    in_flight = 0

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal in_flight
        if request.path in PROBE_PATHS:
            return await handler(request)
        wait_s = limiter.check(client_identity(request, api_key))
        if wait_s > 0:
            return _json_error(
                429,
                f"Rate limit exceeded: at most {limits.burst} requests at once and "
                f"{limits.rate_per_s:g} per second per client; retry after the "
                "Retry-After header's seconds.",
                "rate_limit_exceeded",
                "rate_limit_error",
                wait_s,
            )
        if in_flight >= limits.max_in_flight:
            return _json_error(
                503,
                f"The server is serving {limits.max_in_flight} requests already; retry shortly.",
                "server_busy",
                "server_error",
                1.0,
            )
        length = request.content_length
        if length is not None and length > request.client_max_size:
            return too_large(request)
        in_flight += 1
        try:
            return await handler(request)
        finally:
            in_flight -= 1

    return middleware


# ------------------------------------------------------------------------ command line


def _at_least(lo: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}")
        return value

    return convert


_positive_int = _at_least(1)


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0: off), got {text!r}")
    return value


def add_limit_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """The gateway's HTTP limit flags; their defaults are GatewayLimits'."""
    d = GatewayLimits()
    parser.add_argument(
        "--max-body-mib",
        type=_positive_int,
        default=None,
        help=f"largest request body in MiB (default: {IMAGE_BODY_MIB}, or {VIDEO_BODY_MIB}"
        " for a video model, whose reference image arrives in the body)",
    )
    parser.add_argument(
        "--max-headers",
        type=_positive_int,
        default=d.max_header_count,
        help="most header lines in one request (more: 400)",
    )
    parser.add_argument(
        "--max-header-bytes",
        type=_at_least(256),
        default=d.max_header_line_bytes,
        help="longest request line or header line in bytes (longer: 400)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=_positive_int,
        default=d.max_in_flight,
        help="HTTP requests served at once before 503 with Retry-After",
    )
    parser.add_argument(
        "--rate-limit",
        type=_rate,
        default=d.rate_per_s,
        help="requests per second per API key (per client IP without the key); 0: off",
    )
    parser.add_argument(
        "--rate-burst",
        type=_positive_int,
        default=d.burst,
        help="requests a client may send at once before --rate-limit applies",
    )


def limits_from_args(args: argparse.Namespace) -> GatewayLimits:
    """GatewayLimits from the flags of add_limit_arguments; ValueError if inconsistent."""
    return GatewayLimits(
        max_body_mib=args.max_body_mib,
        max_header_count=args.max_headers,
        max_header_line_bytes=args.max_header_bytes,
        max_in_flight=args.max_in_flight,
        rate_per_s=args.rate_limit,
        burst=args.rate_burst,
    )
