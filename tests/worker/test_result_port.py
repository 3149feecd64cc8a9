"""`disagfusion gateway` as a process: clients on --grpc-port, the stages' results only
on --result-port (so a NetworkPolicy can open one and close the other).

The gateway runs as a real subprocess; its one "monolithic" stage is an in-process
gRPC server that records what the gateway sends it and hands nothing on by itself:
each test delivers the results it wants, where it wants.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import queue
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from disagfusion.cli.gateway import resolve_result_port
from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.gateway.serve import GatewayOptions
from disagfusion.worker.local.launcher import free_port
from disagfusion.worker.runtime.payload import Payload, data_chunks, header_of, params_from_proto
from tests.worker.commands import running
from tests.worker.serve_local import is_ready

HOST = "127.0.0.1"
PNG = b"\x89PNG\r\n\x1a\nresult-port test"


class RecordingStage(pb_grpc.StageServicer):
    """A ready first stage that takes every payload and keeps its header."""

    def __init__(self) -> None:
        self.headers: queue.Queue[pb.WorkHeader] = queue.Queue()

    def Health(self, request: pb.HealthRequest, context: Any) -> pb.HealthReply:
        return pb.HealthReply(stage="monolithic", ready=True, queue_capacity=4)

    def Submit(self, request_iterator: Iterator[pb.WorkChunk], context: Any) -> Iterator[pb.Ack]:
        header = pb.WorkHeader()
        for chunk in request_iterator:  # the sender half-closes after its bytes
            if chunk.HasField("header"):
                header = chunk.header
        self.headers.put(header)
        yield pb.Ack(request_id=header.request_id, status=pb.Ack.RECEIVED)
        yield pb.Ack(request_id=header.request_id, status=pb.Ack.DONE)


@dataclass
class RunningGateway:
    http_port: int
    grpc_port: int
    result_port: int
    stage: RecordingStage
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    stage = RecordingStage()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_StageServicer_to_server(stage, server)
    stage_port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    http_port, grpc_port, result_port = free_port(), free_port(), free_port()
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    args = ["gateway", "--model", "builtin:tiny-unet"]
    args += ["--port", str(http_port), "--grpc-port", str(grpc_port)]
    args += ["--result-port", str(result_port), "--request-timeout", "60"]
    args += ["--topology", json.dumps({"monolithic": [f"{HOST}:{stage_port}"]})]
    try:
        with running(args, log, lambda: is_ready(f"http://{HOST}:{http_port}")):
            yield RunningGateway(http_port, grpc_port, result_port, stage, log)
    finally:
        server.stop(None)


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    code = err.value.code()
    assert isinstance(code, grpc.StatusCode)
    return code


def _post(gateway: RunningGateway, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """An image request to the gateway's HTTP API: (status, JSON answer)."""
    request = urllib.request.Request(
        gateway.url + "/v1/images/generations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=90) as resp:
        return resp.status, json.loads(resp.read())


def _result_stream(
    header: pb.WorkHeader, source_stage: str = "decoder", request_id: str = ""
) -> list[pb.WorkChunk]:
    """What a last stage sends for `header`'s request: its PNGs, inline."""
    params = params_from_proto(header.params)
    result = Payload(
        request_id=request_id or header.request_id,
        params=params,
        tensors={
            f"png.{i}": torch.tensor(list(PNG + bytes([i])), dtype=torch.uint8)
            for i in range(params.num_images)
        },
        reply_to=header.reply_to,
        source_stage=source_stage,
    )
    return [pb.WorkChunk(header=header_of(result)), *data_chunks(result)]


def test_the_client_port_serves_generate_and_not_the_stage_service(
    gateway: RunningGateway,
) -> None:
    with grpc.insecure_channel(f"{HOST}:{gateway.grpc_port}") as channel:
        stage = pb_grpc.StageStub(channel)
        assert _code(lambda: stage.Health(pb.HealthRequest(), timeout=10)) == (
            grpc.StatusCode.UNIMPLEMENTED
        )
        forged = pb.WorkChunk(header=pb.WorkHeader(request_id="forged"))
        assert _code(lambda: list(stage.Submit(iter([forged]), timeout=10))) == (
            grpc.StatusCode.UNIMPLEMENTED
        )
        progress = pb.ProgressReport(request_id="forged", step=1, total=2)
        assert _code(lambda: stage.Progress(progress, timeout=10)) == (
            grpc.StatusCode.UNIMPLEMENTED
        )
        # Generate is served here: a bad request is answered by the gateway's validation.
        generate = pb_grpc.GatewayStub(channel).Generate
        bad = pb.GenerateRequest(prompt="x", size="63x64")
        assert _code(lambda: generate(bad, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT


def test_the_result_port_serves_the_stage_service_and_not_generate(
    gateway: RunningGateway,
) -> None:
    with grpc.insecure_channel(f"{HOST}:{gateway.result_port}") as channel:
        reply = pb_grpc.StageStub(channel).Health(pb.HealthRequest(), timeout=10)
        assert reply.stage == "gateway" and reply.ready
        generate = pb_grpc.GatewayStub(channel).Generate
        request = pb.GenerateRequest(prompt="x", size="64x64")
        assert _code(lambda: generate(request, timeout=10)) == grpc.StatusCode.UNIMPLEMENTED


def test_a_request_names_the_result_port_and_only_a_result_there_answers_it(
    gateway: RunningGateway,
) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(_post, gateway, {"prompt": "a fox", "n": 2, "size": "64x64"})
        header = gateway.stage.headers.get(timeout=60)
        assert header.reply_to == f"{HOST}:{gateway.result_port}"
        stream = _result_stream(header)
        # The finished result, sent to the client port, is refused there...
        with grpc.insecure_channel(f"{HOST}:{gateway.grpc_port}") as channel:
            submit = pb_grpc.StageStub(channel).Submit
            assert _code(lambda: list(submit(iter(stream), timeout=10))) == (
                grpc.StatusCode.UNIMPLEMENTED
            )
        assert not answer.done()
        # ...and answers the client once it reaches the address the request names.
        with grpc.insecure_channel(header.reply_to) as channel:
            acks = list(pb_grpc.StageStub(channel).Submit(iter(stream), timeout=30))
        assert [a.status for a in acks] == [pb.Ack.RECEIVED, pb.Ack.DONE]
        status, reply = answer.result(timeout=60)
    assert status == 200
    assert [base64.b64decode(d["b64_json"]) for d in reply["data"]] == [
        PNG + bytes([0]),
        PNG + bytes([1]),
    ]


def test_the_result_port_defaults_to_the_next_port_and_must_be_its_own() -> None:
    assert resolve_result_port(50051, None, 8000) == 50052
    assert resolve_result_port(50051, 6000, 8000) == 6000
    assert GatewayOptions("m", 8000, 50051, {}).results_at == 50052
    assert GatewayOptions("m", 8000, 50051, {}, result_port=7).results_at == 7
    with pytest.raises(ValueError, match="also --grpc-port"):
        resolve_result_port(50051, 50051, 8000)
    with pytest.raises(ValueError, match="also --port"):
        resolve_result_port(7999, None, 8000)
    with pytest.raises(ValueError, match="set --result-port"):
        resolve_result_port(65535, None, 8000)


def test_a_result_port_clash_is_a_one_line_error() -> None:
    topology = json.dumps({"monolithic": ["h:1"]})
    argv = [sys.executable, "-m", "disagfusion", "gateway", "--grpc-port", "6000"]
    proc = subprocess.run(
        [*argv, "--result-port", "6000", "--topology", topology],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: --result-port: 6000 is also --grpc-port; the result port needs its own"
    )


def _refused(gateway: RunningGateway, reason: str) -> float:
    """disagfusion_gateway_results_refused_total{reason} from the gateway's /metrics."""
    with urllib.request.urlopen(gateway.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("disagfusion_gateway_results_refused_total{") and (
            f'reason="{reason}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_only_the_last_stage_answers_and_only_once(gateway: RunningGateway) -> None:
    before = {r: _refused(gateway, r) for r in ("sender", "answered", "unknown")}
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        answer = pool.submit(_post, gateway, {"prompt": "a forged fox", "size": "64x64"})
        header = gateway.stage.headers.get(timeout=60)
        with grpc.insecure_channel(header.reply_to) as channel:
            submit = pb_grpc.StageStub(channel).Submit
            # A pod that is not the last stage cannot answer for it...
            forged = list(submit(iter(_result_stream(header, "encoder")), timeout=30))
            assert [a.status for a in forged] == [pb.Ack.REJECTED]
            assert "last stage" in forged[0].reason and not forged[0].retryable
            time.sleep(0.5)
            assert not answer.done()
            # ...nor answer a request this gateway does not hold...
            stray = _result_stream(header, request_id="guessed-id")
            assert [a.status for a in submit(iter(stray), timeout=30)] == [
                pb.Ack.RECEIVED,
                pb.Ack.DONE,
            ]
            # ...the decoder's result answers, and a replay of it changes nothing.
            real = _result_stream(header)
            assert [a.status for a in submit(iter(real), timeout=30)][-1] == pb.Ack.DONE
            status, reply = answer.result(timeout=60)
            assert [a.status for a in submit(iter(real), timeout=30)][-1] == pb.Ack.DONE
    assert status == 200 and len(reply["data"]) == 1
    assert _refused(gateway, "sender") == before["sender"] + 1
    assert _refused(gateway, "unknown") == before["unknown"] + 1
    assert _refused(gateway, "answered") == before["answered"] + 1
