"""The gateway in-process: the HTTP API in front of a fake first stage, real gRPC."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.gateway.api import RequestLimits
from disagfusion.worker.gateway.service import Gateway, GatewayConfig, build_http_app
from disagfusion.worker.metrics import HandoffMetrics
from disagfusion.worker.runtime.payload import (
    Payload,
    params_from_proto,
    read_tensors,
)
from disagfusion.worker.runtime.peers import ChannelCache
from disagfusion.worker.runtime.sender import Sender
from tests.worker.runtime_harness import (
    HOST,
    PIPELINE,
    ROLE,
    WAIT_S,
    Cluster,
    free_port,
    wait_until,
)

LIMITS = RequestLimits(
    served_model="fake-model",
    default_size=(64, 64),
    size_multiple=8,
    max_size=256,
    default_steps=10,
    default_guidance=7.5,
)
PNG = b"\x89PNG\r\n\x1a\nfake image "


class FakeFirstStage(pb_grpc.StageServicer):
    """A first stage that answers at once: `ok` sends PNGs to reply_to, `busy` refuses,
    `silent` takes the payload and never sends a result."""

    def __init__(self, channels: ChannelCache) -> None:
        self.mode = "ok"
        self.received: list[str] = []
        self._sender = Sender(ROLE, channels, HandoffMetrics(CollectorRegistry(), ROLE, PIPELINE))

    async def close(self) -> None:
        await self._sender.close()

    async def Health(self, request: pb.HealthRequest, context: object) -> pb.HealthReply:
        return pb.HealthReply(stage="encoder", ready=True, queue_capacity=4)

    async def Submit(
        self, request_iterator: AsyncIterator[pb.WorkChunk], context: object
    ) -> AsyncIterator[pb.Ack]:
        stream = request_iterator.__aiter__()
        header = (await stream.__anext__()).header
        rid = header.request_id
        if self.mode == "busy":
            yield pb.Ack(request_id=rid, status=pb.Ack.REJECTED, reason="busy", retryable=True)
            return
        await read_tensors(header, stream)
        self.received.append(rid)
        yield pb.Ack(request_id=rid, status=pb.Ack.RECEIVED)
        if self.mode == "ok":
            params = params_from_proto(header.params)
            await self._sender.hand_off(
                Payload(
                    request_id=rid,
                    params=params,
                    reply_to=header.reply_to,
                    source_stage=ROLE,
                    tensors={
                        f"png.{i}": torch.tensor(list(PNG + bytes([i])), dtype=torch.uint8)
                        for i in range(params.num_images)
                    },
                )
            )
        yield pb.Ack(request_id=rid, status=pb.Ack.DONE)


async def start_gateway(
    cluster: Cluster, first_stage_addr: str, **config: object
) -> tuple[Gateway, TestClient]:
    result_port = free_port()
    settings: dict[str, Any] = {"limits": LIMITS, **config}
    gateway = Gateway(
        GatewayConfig(
            model="fake-model",
            first_stage="encoder",
            stage_addrs={"encoder": [first_stage_addr]},
            result_address=f"{HOST}:{result_port}",
            pipeline=PIPELINE,
            **settings,
        )
    )
    await cluster.serve(gateway, result_port)
    gateway.start()
    client = TestClient(TestServer(build_http_app(gateway)))
    await client.start_server()
    cluster.closers += [gateway.stop, client.close]
    return gateway, client


async def fake_first_stage(cluster: Cluster) -> tuple[FakeFirstStage, str]:
    stage = FakeFirstStage(cluster.channels)
    cluster.closers.append(stage.close)
    return stage, await cluster.serve(stage)


def gateway_gauge(gateway: Gateway, name: str) -> float | None:
    return gateway.metrics.registry.get_sample_value(
        f"disagfusion_gateway_{name}_requests", {"pipeline": PIPELINE}
    )


async def ready(gateway: Gateway) -> None:
    await wait_until(lambda: gateway.readiness()[0], "gateway ready")


GENERATIONS = "/v1/images/generations"


async def test_gateway_returns_images_as_b64(cluster: Cluster) -> None:
    first, addr = await fake_first_stage(cluster)
    gateway, client = await start_gateway(cluster, addr)
    await ready(gateway)

    resp = await client.post(GENERATIONS, json={"prompt": "a cat", "n": 2, "seed": 7})
    body = await resp.json()
    assert resp.status == 200, body
    assert [base64.b64decode(d["b64_json"]) for d in body["data"]] == [PNG + b"\x00", PNG + b"\x01"]
    assert [d["seed"] for d in body["data"]] == [7, 8]  # each image's own seed
    assert resp.headers["X-Request-Id"] == first.received[0]


async def test_gateway_uses_the_clients_request_id(cluster: Cluster) -> None:
    first, addr = await fake_first_stage(cluster)
    gateway, client = await start_gateway(cluster, addr)
    await ready(gateway)

    for _ in range(2):  # a reused id is still two requests in the pipeline
        resp = await client.post(
            GENERATIONS, json={"prompt": "a cat"}, headers={"X-Request-Id": "trace-42"}
        )
        assert resp.status == 200, await resp.json()
        assert resp.headers["X-Request-Id"] == "trace-42"
    assert len(first.received) == 2 and len(set(first.received)) == 2
    assert all(rid.startswith("trace-42.") for rid in first.received)

    resp = await client.post(
        GENERATIONS, json={"prompt": "a cat"}, headers={"X-Request-Id": "bad id\twith tab"}
    )
    body = await resp.json()
    assert resp.status == 400 and body["error"]["param"] == "X-Request-Id", body
    assert resp.headers["X-Request-Id"]  # a fresh one, even on this error
    assert len(first.received) == 2


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/", 404, "not_found"),
        ("GET", "/v1/nope", 404, "not_found"),
        ("POST", "/v1/models", 405, "method_not_allowed"),
        ("GET", GENERATIONS, 405, "method_not_allowed"),
        ("GET", "/v1/models/other-model", 404, "model_not_found"),
    ],
)
async def test_every_error_is_openai_shaped_json_with_a_request_id(
    cluster: Cluster, method: str, path: str, status: int, code: str
) -> None:
    _, addr = await fake_first_stage(cluster)
    _, client = await start_gateway(cluster, addr)

    resp = await client.request(method, path)
    body = await resp.json()
    assert resp.status == status, body
    assert resp.content_type == "application/json"
    assert body["error"]["code"] == code and body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert resp.headers["X-Request-Id"]
    if status == 405:
        assert resp.headers["Allow"]


async def test_models_list_and_retrieve_by_id_or_alias(cluster: Cluster) -> None:
    _, addr = await fake_first_stage(cluster)
    limits = dataclasses.replace(LIMITS, model_aliases=("builtin:fake", "org/fake-model"))
    _, client = await start_gateway(cluster, addr, limits=limits)

    listing = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in listing["data"]] == ["fake-model"]
    card = listing["data"][0]
    assert card["object"] == "model" and isinstance(card["created"], int)
    for name in ("fake-model", "builtin:fake", "org/fake-model"):
        resp = await client.get(f"/v1/models/{name}")
        assert resp.status == 200 and (await resp.json()) == card


async def test_a_draining_gateway_refuses_new_requests_with_503_and_retry_after(
    cluster: Cluster,
) -> None:
    first, addr = await fake_first_stage(cluster)
    first.mode = "silent"
    gateway, client = await start_gateway(cluster, addr)
    await ready(gateway)
    accepted = asyncio.create_task(client.post(GENERATIONS, json={"prompt": "accepted"}))
    await wait_until(lambda: gateway.pending_count == 1, "request accepted")

    draining = asyncio.create_task(gateway.drain(timeout_s=0.3))
    await asyncio.sleep(0)
    resp = await client.post(GENERATIONS, json={"prompt": "late"})
    body = await resp.json()
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1, body
    assert "shutting down" in body["error"]["message"]
    assert (await client.get("/readyz")).status == 503

    assert await draining is False  # the accepted one never finished ...
    await gateway.stop()  # ... so it is answered explicitly
    resp = await asyncio.wait_for(accepted, WAIT_S)
    assert resp.status == 503, await resp.json()
    assert "shut down before this request finished" in (await resp.json())["error"]["message"]


async def test_a_stage_that_was_ready_and_restarts_still_admits_requests(cluster: Cluster) -> None:
    first, addr = await fake_first_stage(cluster)
    gateway, client = await start_gateway(cluster, addr)
    await ready(gateway)
    # The only first-stage instance goes away (a crashed worker being restarted).
    await cluster.servers[0].stop(0)
    await wait_until(lambda: not gateway.readiness()[0], "gateway sees the stage gone")
    waiting = asyncio.create_task(client.post(GENERATIONS, json={"prompt": "during restart"}))
    await wait_until(lambda: gateway.pending_count == 1, "request admitted, not refused")
    await cluster.serve(first, int(addr.rsplit(":", 1)[1]))  # back on the same port
    resp = await asyncio.wait_for(waiting, WAIT_S * 2)
    assert resp.status == 200, await resp.json()


async def test_gateway_answers_429_with_retry_after_when_the_pipeline_is_full(
    cluster: Cluster,
) -> None:
    first, addr = await fake_first_stage(cluster)
    first.mode = "busy"
    gateway, client = await start_gateway(cluster, addr, max_waiting=1)
    await ready(gateway)

    waiting = asyncio.create_task(client.post(GENERATIONS, json={"prompt": "first"}))
    await wait_until(lambda: gateway_gauge(gateway, "waiting") == 1, "first request waiting")
    resp = await client.post(GENERATIONS, json={"prompt": "second"})
    body = await resp.json()
    assert resp.status == 429, body
    assert int(resp.headers["Retry-After"]) >= 1
    assert body["error"]["code"] == "pipeline_full"
    assert body["error"]["type"] == "rate_limit_error"

    # The waiting request was kept, not dropped: it completes once the stage has room.
    first.mode = "ok"
    resp = await asyncio.wait_for(waiting, WAIT_S)
    assert resp.status == 200, await resp.json()


async def test_gateway_answers_503_when_no_first_stage_instance_is_ready(
    cluster: Cluster,
) -> None:
    _, client = await start_gateway(cluster, f"{HOST}:{free_port()}")  # nobody listens there

    resp = await client.post(GENERATIONS, json={"prompt": "a cat"})
    body = await resp.json()
    assert resp.status == 503, body
    assert body["error"]["code"] == "not_ready"
    assert "encoder" in body["error"]["message"]
    ready_resp = await client.get("/readyz")
    assert ready_resp.status == 503


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}],
    ids=["missing", "wrong-key", "not-bearer"],
)
async def test_gateway_requires_the_api_key(cluster: Cluster, headers: dict[str, str]) -> None:
    first, addr = await fake_first_stage(cluster)
    gateway, client = await start_gateway(cluster, addr, api_key="secret")
    await ready(gateway)

    resp = await client.post(GENERATIONS, json={"prompt": "a cat"}, headers=headers)
    body = await resp.json()
    assert resp.status == 401, body
    assert body["error"]["code"] == "invalid_api_key"
    assert first.received == []

    resp = await client.post(
        GENERATIONS, json={"prompt": "a cat"}, headers={"Authorization": "Bearer secret"}
    )
    assert resp.status == 200, await resp.json()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"{not json", "invalid_json"),
        (b'["a cat"]', "invalid_json"),
        (b"{}", "missing_field"),
        (b'{"prompt": "a cat", "size": "13x13"}', None),
    ],
    ids=["not-json", "not-an-object", "no-prompt", "bad-size"],
)
async def test_gateway_answers_400_for_a_bad_body(
    cluster: Cluster, data: bytes, code: str | None
) -> None:
    first, addr = await fake_first_stage(cluster)
    gateway, client = await start_gateway(cluster, addr)
    await ready(gateway)

    resp = await client.post(GENERATIONS, data=data, headers={"Content-Type": "application/json"})
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["type"] == "invalid_request_error"
    if code is not None:
        assert body["error"]["code"] == code
    assert first.received == []


async def test_gateway_answers_504_when_no_result_arrives_in_time(cluster: Cluster) -> None:
    first, addr = await fake_first_stage(cluster)
    first.mode = "silent"
    gateway, client = await start_gateway(cluster, addr, request_timeout_s=0.05)
    await ready(gateway)

    resp = await client.post(GENERATIONS, json={"prompt": "a cat"})
    body = await resp.json()
    assert resp.status == 504, body
    assert body["error"]["code"] == "deadline_exceeded"
    assert len(first.received) == 1
    assert gateway_gauge(gateway, "pending") == 0
