"""`disagfusion worker`: one stage worker process, until SIGTERM.

On SIGTERM or SIGINT a worker drains: it stops accepting new work (peers see
it draining and go elsewhere), finishes what it holds and hands it on, then
exits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import torch
from aiohttp import web

from disagfusion.worker.params import DEFAULT_MAX_IMAGES, GenerationParams, WorkerRole
from disagfusion.worker.probes import add_probe_routes, start_site
from disagfusion.worker.runtime.aio import wait_for_signal
from disagfusion.worker.runtime.batching import (
    BatchCompute,
    ComputeFn,
    Outcome,
    Request,
    Tensors,
)
from disagfusion.worker.runtime.peers import SERVER_OPTIONS
from disagfusion.worker.runtime.sender import HandoffDelay
from disagfusion.worker.runtime.stage import RuntimeConfig, StageRuntime
from disagfusion.worker.security import tls as security
from disagfusion.worker.transport.inline_wire import add_stage_servicer

if TYPE_CHECKING:
    from disagfusion.worker.models.stages import StageModel

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
    family: str = "auto"
    queue_capacity: int = 2
    overlap: bool = True
    handoff_delay: HandoffDelay = field(default_factory=HandoffDelay)
    threads: int | None = None
    drain_timeout_s: float = 120.0
    transport: str = "grpc"
    transport_options: dict[str, str] = field(default_factory=dict)
    max_batch: int | None = None  # None: the model's default
    batch_wait_s: float = 0.0
    queue_order: str = "fifo"
    slowdown: float = 1.0  # emulated slower accelerator
    max_images: int = DEFAULT_MAX_IMAGES  # the gateway's largest n: bounds payloads
    tls: security.TlsConfig | None = None  # mTLS on the Stage port and to every peer


class StageCompute:
    """A loaded stage as the runtime runs it: batched calls, and on the last hop
    each request's images encoded as PNG (or its video as MP4) after the split."""

    def __init__(self, stage: StageModel, max_images: int = DEFAULT_MAX_IMAGES) -> None:
        self.stage = stage
        self.max_images = max_images
        self._encodes = stage.role in ("decoder", "monolithic")

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        outcomes = self.stage.run_batch(requests)
        return [
            out if isinstance(out, Exception) else self._finish_one(params, out)
            for (params, _), out in zip(requests, outcomes, strict=True)
        ]

    def _finish_one(self, params: GenerationParams, out: Tensors) -> Outcome:
        try:
            return self._finish(params, out)
        except Exception as err:  # one request's encoding fails alone
            return err

    def __call__(self, params: GenerationParams, inputs: Tensors) -> Tensors:
        (out,) = self.run_batch([(params, inputs)])
        if isinstance(out, Exception):
            raise out
        return out

    def batch_key(self, params: GenerationParams, tensors: Tensors) -> Hashable | None:
        return self.stage.batch_key(params, tensors)

    def default_max_batch(self) -> int:
        return self.stage.default_max_batch()

    def max_input_bytes(self) -> int:
        return self.stage.max_input_bytes(self.max_images)

    def _finish(self, params: GenerationParams, out: Tensors) -> Tensors:
        if not self._encodes:
            return out
        from disagfusion.worker.models import images_to_png

        images = out["images"]
        if self.stage.info.is_video:
            return encode_videos(images, params)
        return {
            f"png.{i}": torch.frombuffer(bytearray(png), dtype=torch.uint8)
            for i, png in enumerate(images_to_png(images))
        }


def make_compute(
    role: WorkerRole,
    model: str,
    device: str,
    dtype: str | None,
    family: str = "auto",
    max_images: int = DEFAULT_MAX_IMAGES,
) -> StageCompute:
    """Load the stage's model; the last hop also encodes its images as PNG."""
    from disagfusion.worker.models import load_stage

    stage = load_stage(role, model, device=device, dtype=dtype, family=family)
    return StageCompute(stage, max_images)


def encode_videos(videos: torch.Tensor, params: GenerationParams) -> dict[str, torch.Tensor]:
    """Per video i of uint8 (n, F, H, W, 3): `mp4.i`, its first frame as `thumb.i`
    (PNG), and with keep_frames the lossless frames as `frames.i`."""
    from disagfusion.worker.models import images_to_png
    from disagfusion.worker.models.video import encode_mp4

    out: dict[str, torch.Tensor] = {}
    for i, frames in enumerate(videos):
        mp4 = encode_mp4(frames.numpy(), params.fps)
        out[f"mp4.{i}"] = torch.frombuffer(bytearray(mp4), dtype=torch.uint8)
        (thumb,) = images_to_png(frames[:1])
        out[f"thumb.{i}"] = torch.frombuffer(bytearray(thumb), dtype=torch.uint8)
        if params.keep_frames:
            out[f"frames.{i}"] = frames.contiguous()
    return out


async def run_worker(
    opts: WorkerOptions, compute_factory: Callable[[], BatchCompute | ComputeFn] | None = None
) -> int:
    security.check_data_plane(opts.transport, opts.tls)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    # Before the runtime exists: it makes its channels to peers with the process's TLS.
    security.configure(opts.tls)
    try:
        return await _run(opts, compute_factory)
    finally:
        security.configure(None)


async def _run(
    opts: WorkerOptions, compute_factory: Callable[[], BatchCompute | ComputeFn] | None
) -> int:
    from disagfusion.worker.models import StageInputError

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
            transport=opts.transport,
            transport_options=opts.transport_options,
            device=opts.device,
            max_batch=opts.max_batch,
            batch_wait_s=opts.batch_wait_s,
            queue_order=opts.queue_order,
            slowdown=opts.slowdown,
        ),
        input_error=StageInputError,
    )
    server = await start_stage_server(runtime, opts.host, opts.port, opts.tls)
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
        lambda: make_compute(
            opts.role, opts.model, opts.device, opts.dtype, opts.family, opts.max_images
        )
    )
    loading = asyncio.create_task(runtime.load(factory))
    signalled = asyncio.create_task(wait_for_signal())
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


async def start_stage_server(
    servicer: StageRuntime, host: str, port: int, tls: security.TlsConfig | None
) -> grpc.aio.Server:
    """The Stage service on host:port; with `tls`, only clients holding a certificate
    of the pipeline's CA complete the handshake."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_stage_servicer(servicer, server)
    if security.add_port(server, f"{host}:{port}", tls) == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    await server.start()
    if tls is not None:
        log.info("Stage service on %s:%d requires mTLS (client certificates)", host, port)
    return server
