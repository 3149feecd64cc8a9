"""Process entry points: one stage worker, or one gateway, until SIGTERM.

On SIGTERM or SIGINT a worker drains: it stops accepting new work (peers see
it draining and go elsewhere), finishes what it holds and hands it on, then
exits. The gateway drains too: new requests get 503 with Retry-After, the
accepted ones finish (or, past its drain timeout, are answered with an
explicit error), then it exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from aiohttp import web

from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.api import RequestLimits
from disagfusion.worker.gateway import Gateway, GatewayConfig, GatewayGrpc, build_http_app
from disagfusion.worker.params import GenerationParams, WorkerRole
from disagfusion.worker.peers import SERVER_OPTIONS
from disagfusion.worker.probes import add_probe_routes, start_site
from disagfusion.worker.runtime import ComputeFn, RuntimeConfig, StageRuntime, start_grpc_server
from disagfusion.worker.sender import HandoffDelay

log = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    role: WorkerRole
    model: str
    port: int
    http_port: int
    host: str = "127.0.0.1"
    next_addrs: list[str] = field(default_factory=list)
    pipeline: str = "local"
    device: str = "cpu"
    dtype: str | None = None
    queue_capacity: int = 2
    overlap: bool = True
    handoff_delay: HandoffDelay = field(default_factory=HandoffDelay)
    threads: int | None = None
    drain_timeout_s: float = 120.0


def make_compute(role: WorkerRole, model: str, device: str, dtype: str | None) -> ComputeFn:
    """Load the stage's model; the last hop also encodes its images as PNG."""
    from disagfusion.worker.models import images_to_png, load_stage

    stage = load_stage(role, model, device=device, dtype=dtype)
    if role not in ("decoder", "monolithic"):
        return stage.run

    def run_and_encode(
        params: GenerationParams, inputs: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        images = stage.run(params, inputs)["images"]
        return {
            f"png.{i}": torch.frombuffer(bytearray(png), dtype=torch.uint8)
            for i, png in enumerate(images_to_png(images))
        }

    return run_and_encode


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_worker(
    opts: WorkerOptions, compute_factory: Callable[[], ComputeFn] | None = None
) -> int:
    from disagfusion.worker.models import StageInputError

    if opts.threads:
        torch.set_num_threads(opts.threads)
    runtime = StageRuntime(
        RuntimeConfig(
            role=opts.role,
            model=opts.model,
            pipeline=opts.pipeline,
            next_addrs=opts.next_addrs,
            queue_capacity=opts.queue_capacity,
            overlap=opts.overlap,
            handoff_delay=opts.handoff_delay,
            drain_timeout_s=opts.drain_timeout_s,
        ),
        input_error=StageInputError,
    )
    server = await start_grpc_server(runtime, opts.host, opts.port)
    app = web.Application()
    add_probe_routes(
        app,
        runtime.metrics.registry,
        lambda: (
            runtime.ready,
            "ready" if runtime.ready else ("draining" if runtime.draining else "loading model"),
        ),
    )
    runner = await start_site(app, opts.host, opts.http_port)
    runtime.start()
    factory = compute_factory or (
        lambda: make_compute(opts.role, opts.model, opts.device, opts.dtype)
    )
    loading = asyncio.create_task(runtime.load(factory))
    signalled = asyncio.create_task(_wait_for_signal())
    await asyncio.wait({loading, signalled}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if loading.done() and loading.exception() is not None:
        log.error("%s could not load %s: %s", opts.role, opts.model, loading.exception())
        code = 1
    else:
        await signalled
        if not loading.done():
            loading.cancel()
        log.info("%s draining", opts.role)
        if not await runtime.drain():
            log.warning("%s drain timed out; exiting with work held", opts.role)
    signalled.cancel()
    await server.stop(1.0)
    await runtime.stop()
    await runner.cleanup()
    return code


@dataclass
class GatewayOptions:
    model: str
    port: int
    grpc_port: int
    stage_addrs: dict[str, list[str]]
    host: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"
    pipeline: str = "local"
    max_waiting: int = 32
    max_pending: int = 512
    request_timeout_s: float = 300.0
    api_key: str | None = None
    handoff_delay: HandoffDelay = field(default_factory=HandoffDelay)
    max_images: int = 4
    served_model_name: str | None = None
    drain_timeout_s: float = 60.0


def limits_for(
    model: str, max_images: int = 4, served_name: str | None = None
) -> tuple[str, RequestLimits]:
    """The public model id and the request limits; `model` (the source string as
    given) and the display name are accepted as aliases of the id."""
    from disagfusion.worker.models import describe_model

    info = describe_model(model)
    public = served_name or info.name
    aliases = tuple(dict.fromkeys(a for a in (model, info.name) if a != public))
    return public, RequestLimits(
        served_model=public,
        model_aliases=aliases,
        default_size=info.default_size,
        size_multiple=info.size_multiple,
        max_size=info.max_size,
        default_steps=info.default_steps,
        default_guidance=info.default_guidance,
        max_n=max_images,
    )


async def run_gateway(opts: GatewayOptions) -> int:
    import grpc

    name, limits = limits_for(opts.model, opts.max_images, opts.served_model_name)
    first = "monolithic" if "monolithic" in opts.stage_addrs else "encoder"
    gateway = Gateway(
        GatewayConfig(
            model=name,
            limits=limits,
            first_stage=first,
            stage_addrs=opts.stage_addrs,
            result_address=f"{opts.advertise_host}:{opts.grpc_port}",
            pipeline=opts.pipeline,
            max_waiting=opts.max_waiting,
            max_pending=opts.max_pending,
            request_timeout_s=opts.request_timeout_s,
            api_key=opts.api_key,
            handoff_delay=opts.handoff_delay,
        )
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_StageServicer_to_server(gateway, server)
    pb_grpc.add_GatewayServicer_to_server(GatewayGrpc(gateway), server)
    if server.add_insecure_port(f"{opts.host}:{opts.grpc_port}") == 0:
        raise OSError(f"cannot listen on {opts.host}:{opts.grpc_port}")
    await server.start()
    gateway.start()
    runner = await start_site(build_http_app(gateway), opts.host, opts.port)
    log.info("gateway for %s on http://%s:%d", name, opts.host, opts.port)
    await _wait_for_signal()
    # Keep listening while draining: new requests get 503 + Retry-After, and
    # results for the accepted ones still arrive on the gRPC port.
    log.info("gateway draining: %d accepted request(s) to finish", gateway.pending_count)
    if not await gateway.drain(opts.drain_timeout_s):
        log.warning(
            "drain timeout (%gs): answering %d request(s) with an error",
            opts.drain_timeout_s,
            gateway.pending_count,
        )
    await gateway.stop()  # fails whatever is left, explicitly
    await runner.cleanup()  # the handlers write those answers before the sockets close
    await server.stop(1.0)
    return 0
