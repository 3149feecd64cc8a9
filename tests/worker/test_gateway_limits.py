"""The gateway's HTTP limits (limits.py): the token bucket on a fake clock, then the
limits on a real aiohttp server in front of a Gateway: 413, 429 with Retry-After (and
the official openai client's RateLimitError), the header limits, the in-flight bound."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from disagfusion.worker.gateway.api import RequestLimits
from disagfusion.worker.gateway.limits import (
    GatewayLimits,
    RateLimiter,
    TokenBucket,
    add_limit_arguments,
    limits_from_args,
)
from disagfusion.worker.gateway.service import Gateway, GatewayConfig, build_http_app

pytestmark = pytest.mark.timeout(60)

LIMITS = RequestLimits(
    served_model="tiny",
    default_size=(64, 64),
    size_multiple=16,
    max_size=256,
    default_steps=10,
    default_guidance=7.5,
)
KEY = "sk-limits"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------ token bucket


def test_a_bucket_lets_a_burst_through_then_paces_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.25) == pytest.approx(0.25)  # a refused request spends nothing
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) == pytest.approx(0.5)


def test_a_bucket_holds_at_most_its_burst() -> None:
    bucket = TokenBucket(rate=10.0, burst=2, now=0.0)
    assert bucket.take(1000.0) == 0.0 and bucket.take(1000.0) == 0.0
    assert bucket.take(1000.0) > 0


def test_a_clock_that_steps_back_adds_no_tokens() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) == pytest.approx(1.0)
    assert bucket.take(10.5) == pytest.approx(0.5)  # the refill counts from 10, not 5


def test_clients_have_their_own_buckets_and_the_oldest_are_forgotten() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=1, max_clients=2, clock=clock)
    assert limiter.check("a") == 0.0 and limiter.check("b") == 0.0
    assert limiter.check("a") > 0 and limiter.check("b") > 0
    assert limiter.check("c") == 0.0  # a third client: "a", seen least recently, is dropped
    assert len(limiter) == 2
    assert limiter.check("b") > 0
    assert limiter.check("a") == 0.0  # a fresh bucket
    clock.now += 1.0
    assert limiter.check("c") == 0.0


def test_a_rate_of_zero_turns_the_limit_off() -> None:
    limiter = RateLimiter(rate=0.0, burst=1, max_clients=1)
    assert all(limiter.check("a") == 0.0 for _ in range(1000))
    assert len(limiter) == 0


# ------------------------------------------------------------------------ configuration


def test_the_defaults_and_what_they_mean_for_aiohttp() -> None:
    limits = GatewayLimits()
    assert (limits.body_bytes(video=False), limits.body_bytes(video=True)) == (1 << 20, 32 << 20)
    assert GatewayLimits(max_body_mib=4).body_bytes(video=True) == 4 << 20
    assert limits.handler_args() == {
        "max_line_size": 8190,
        "max_field_size": 8190,
        "max_headers": 100,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_body_mib": 0}, "max_body_mib"),
        ({"max_header_count": 0}, "max_header_count"),
        ({"max_header_line_bytes": 100}, "max_header_line_bytes"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"rate_per_s": -1.0}, "rate_per_s"),
        ({"rate_per_s": float("inf")}, "rate_per_s"),
        ({"burst": 0}, "burst"),
    ],
)
def test_inconsistent_limits_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GatewayLimits(**overrides)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_limit_arguments(parser)
    return parser.parse_args(argv)


def test_the_flags_default_to_the_defaults_and_set_each_limit() -> None:
    assert limits_from_args(_parse()) == GatewayLimits()
    flags = "--max-body-mib 8 --max-headers 50 --max-header-bytes 4096 --max-in-flight 9"
    flags += " --rate-limit 2.5 --rate-burst 7"
    assert limits_from_args(_parse(*flags.split())) == GatewayLimits(
        max_body_mib=8,
        max_header_count=50,
        max_header_line_bytes=4096,
        max_in_flight=9,
        rate_per_s=2.5,
        burst=7,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--rate-limit", "-1"],
        ["--rate-limit", "fast"],
        ["--rate-burst", "0"],
        ["--max-header-bytes", "100"],
        ["--max-in-flight", "many"],
    ],
)
def test_bad_flags_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert argv[0] in capsys.readouterr().err


# ------------------------------------------------------------------------ a real server


class Served:
    def __init__(self, server: TestServer, clock: FakeClock) -> None:
        self.server = server
        self.clock = clock
        self.url = str(server.make_url(""))

    async def get(self, path: str, **headers: str) -> tuple[int, Mapping[str, str], Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + path, headers=headers) as resp,
        ):
            body = await resp.json() if resp.content_type == "application/json" else None
            return resp.status, resp.headers.copy(), body  # names case-insensitive


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a gateway app with the given GatewayLimits; nothing listens on its stage
    address, so a request that passes the limits and validation is answered 503."""
    started: list[tuple[Gateway, TestServer]] = []

    async def start(api_key: str | None = None, **limits: Any) -> Served:
        gateway = Gateway(
            GatewayConfig(
                model="tiny",
                limits=LIMITS,
                first_stage="encoder",
                stage_addrs={"encoder": ["127.0.0.1:9"]},
                result_address="127.0.0.1:9",
                api_key=api_key,
            )
        )
        clock = FakeClock()
        server = TestServer(build_http_app(gateway, GatewayLimits(**limits), clock=clock))
        await server.start_server()
        started.append((gateway, server))
        return Served(server, clock)

    yield start
    for gateway, server in started:
        await server.close()
        await gateway.stop()


def _error(body: Any) -> dict[str, Any]:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


async def test_a_body_over_the_limit_is_a_json_413(serve: Serve) -> None:
    served = await serve()
    big = b"{" + b" " * (1 << 20) + b"}"

    piece = 64 << 10

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), piece):
            yield big[start : start + piece]

    async with aiohttp.ClientSession() as session:
        # announced (Content-Length: refused before reading), then chunked (while reading)
        for data in (io.BytesIO(big), chunked()):
            url = served.url + "/v1/images/generations"
            async with session.post(url, data=data) as resp:
                assert resp.status == 413
                error = _error(await resp.json())
                assert error["code"] == "too_large"
                assert "1048576 bytes" in error["message"]
                assert resp.headers["X-Request-Id"]


async def test_the_rate_limit_answers_429_with_retry_after_until_the_bucket_refills(
    serve: Serve,
) -> None:
    served = await serve(rate_per_s=0.5, burst=2)
    assert [(await served.get("/v1/models"))[0] for _ in range(2)] == [200, 200]
    status, headers, body = await served.get("/v1/models")
    assert status == 429 and headers["Retry-After"] == "2"
    error = _error(body)
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    assert "0.5 per second" in error["message"]
    assert headers["X-Request-Id"]
    # probes are never limited; the rest is, /openapi.json included
    assert (await served.get("/healthz"))[0] == 200
    assert (await served.get("/openapi.json"))[0] == 429
    served.clock.now += 2.0
    assert (await served.get("/v1/models"))[0] == 200


async def test_the_key_holder_and_other_clients_have_separate_buckets(serve: Serve) -> None:
    served = await serve(api_key=KEY, burst=1, rate_per_s=0.1)
    key = {"Authorization": f"Bearer {KEY}"}
    assert (await served.get("/v1/models", **key))[0] == 200
    assert (await served.get("/v1/models", **key))[0] == 429
    assert (await served.get("/v1/models"))[0] == 200  # this IP's own bucket
    # a made-up key is no identity: it shares the IP's (now empty) bucket
    assert (await served.get("/v1/models", Authorization="Bearer sk-made-up"))[0] == 429


async def test_the_openai_client_gets_a_rate_limit_error(serve: Serve) -> None:
    served = await serve(api_key=KEY, burst=1, rate_per_s=0.25)
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
    try:
        assert [m.id for m in (await client.models.list()).data] == ["tiny"]
        with pytest.raises(openai.RateLimitError) as info:
            await client.images.generate(prompt="a red fox", size="64x64")
        assert info.value.status_code == 429
        assert info.value.response.headers["retry-after"] == "4"
        assert "Rate limit exceeded" in info.value.message
    finally:
        await client.close()


async def test_headers_over_the_limits_are_refused_and_the_server_goes_on(serve: Serve) -> None:
    served = await serve(max_header_count=20, max_header_line_bytes=1024)
    many = {f"X-Extra-{i}": "1" for i in range(30)}
    async with aiohttp.ClientSession() as session:
        async with session.get(served.url + "/v1/models", headers=many) as resp:
            assert resp.status == 400
            assert "Too many headers" in await resp.text()
        long = {"X-Long": "v" * 2000}
        async with session.get(served.url + "/v1/models", headers=long) as resp:
            assert resp.status == 400
            assert "Got more than 1024 bytes" in await resp.text()
        async with session.get(served.url + "/v1/models" + "?q=" + "x" * 2000) as resp:
            assert resp.status == 400  # the request line counts too
    fine = {f"X-Extra-{i}": "1" for i in range(10)}
    assert (await served.get("/v1/models", **fine))[0] == 200


async def test_requests_over_max_in_flight_are_a_503_with_retry_after(serve: Serve) -> None:
    served = await serve(max_in_flight=1)
    host, port = served.server.host, served.server.port
    assert port is not None
    # One request stays in flight: its body (100 bytes announced) arrives slowly.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"prompt": '
    )
    await writer.drain()
    try:
        for _ in range(200):
            status, headers, body = await served.get("/v1/models")
            if status == 503:
                break
            await asyncio.sleep(0.01)
        assert status == 503 and headers["Retry-After"] == "1"
        assert _error(body)["code"] == "server_busy"
        assert (await served.get("/readyz"))[0] in (200, 503)  # probes are not counted
        assert (await served.get("/healthz"))[0] == 200
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    for _ in range(200):  # the slow request ended with its connection
        if (await served.get("/v1/models"))[0] == 200:
            break
        await asyncio.sleep(0.01)
    assert (await served.get("/v1/models"))[0] == 200
    del reader
