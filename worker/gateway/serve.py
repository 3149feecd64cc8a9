"""`disagfusion gateway`: the gateway process, until SIGTERM.

Two gRPC servers: clients' `Gateway.Generate` on `grpc_port`, and the `Stage`
service the stages deliver results (and progress, and terminal errors) to on
`result_port`, the address every request names as its reply_to. Apart, a
NetworkPolicy can leave the client port open and admit only the pipeline's
stages to the result port; a client cannot post a forged result.

With TLS (`tls`), the result port and every channel to a stage are mTLS (the
pipeline's CA, client certificates required: worker/security/tls.py). The
client ports (HTTP and Generate) stay as they are: they are the public API,
guarded by the API key and whatever terminates TLS in front of the gateway
(an Ingress, a mesh); requiring the pipeline's client certificates there would
turn a stage identity into a client credential.

On SIGTERM the gateway drains: new requests get 503 with Retry-After, the
accepted ones finish (or, past its drain timeout, are answered with an
explicit error), then it exits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.gateway.api import RequestLimits
from disagfusion.worker.gateway.limits import GatewayLimits
from disagfusion.worker.gateway.service import Gateway, GatewayConfig, GatewayGrpc, build_http_app
from disagfusion.worker.params import DEFAULT_MAX_IMAGES
from disagfusion.worker.probes import start_site
from disagfusion.worker.runtime.aio import wait_for_signal
from disagfusion.worker.runtime.peers import SERVER_OPTIONS
from disagfusion.worker.runtime.sender import HandoffDelay
from disagfusion.worker.security import tls as security
from disagfusion.worker.transport.inline_wire import add_stage_servicer

if TYPE_CHECKING:
    from disagfusion.worker.gateway.jobs import JobManager
    from disagfusion.worker.gateway.jobstore import JobStore
    from disagfusion.worker.gateway.video_api import VideoLimits
    from disagfusion.worker.models import ModelInfo

log = logging.getLogger(__name__)


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
    max_images: int = DEFAULT_MAX_IMAGES
    served_model_name: str | None = None
    drain_timeout_s: float = 60.0
    family: str = "auto"
    # Video models: the Videos API's jobs live in a job store (SQLite in data_dir,
    # or Redis); finished videos are kept video_retention_s.
    data_dir: str = ""
    job_store: str = ""
    video_retention_s: float = 86400.0
    video_timeout_s: float = 3600.0
    transport: str = "grpc"
    slo: str | None = None
    transport_options: dict[str, str] = field(default_factory=dict)
    result_port: int | None = None  # None: grpc_port + 1 (the CLI's default)
    tls: security.TlsConfig | None = None  # mTLS on the result port and to the stages
    http_limits: GatewayLimits = field(default_factory=GatewayLimits)  # body, headers, rate

    @property
    def results_at(self) -> int:
        return self.result_port if self.result_port is not None else self.grpc_port + 1


def limits_for(
    model: str,
    max_images: int = DEFAULT_MAX_IMAGES,
    served_name: str | None = None,
    family: str = "auto",
) -> tuple[str, RequestLimits]:
    """The public model id and the request limits; `model` (the source string as
    given) and the display name are accepted as aliases of the id."""
    from disagfusion.worker.models import describe_model

    info = describe_model(model, family=family)
    spec = info.family_spec
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
        no_negative_prompt=(
            None
            if spec.negative_prompt
            else f"{info.pipeline_class} models take no negative prompt ({spec.name} family)"
        ),
    )


def video_limits_for(info: ModelInfo, public: str, aliases: tuple[str, ...]) -> VideoLimits:
    """The Videos API's bounds for a video model."""
    from disagfusion.worker.gateway.video_api import VideoLimits

    return VideoLimits(
        served_model=public,
        model_aliases=aliases,
        default_size=info.default_size,
        size_multiple=info.size_multiple,
        max_size=info.max_size,
        default_steps=info.default_steps,
        default_guidance=info.default_guidance,
        default_frames=info.default_frames,
        frame_step=info.frame_step,
        max_frames=info.max_frames,
        default_fps=info.default_fps,
        reference="required" if info.reference == "required" else "refused",
    )


def default_data_dir() -> Path:
    """Where a gateway keeps its jobs without --data-dir: beside the model cache,
    so it outlives the gateway process (and `serve --local` restarts)."""
    from disagfusion.worker.models.builtin import default_cache_dir

    return default_cache_dir().parent / "jobs"


async def start_jobs(
    opts: GatewayOptions, gateway: Gateway, app: web.Application, info: ModelInfo
) -> tuple[JobManager, JobStore]:
    """The Videos API on `app`: a job store, and a manager resuming its jobs."""
    from disagfusion.worker.gateway.jobs import JobManager
    from disagfusion.worker.gateway.jobstore import open_job_store
    from disagfusion.worker.gateway.video_runner import video_runner
    from disagfusion.worker.gateway.videos_http import add_video_routes, bearer_auth

    limits = gateway.config.limits
    data_dir = Path(opts.data_dir) if opts.data_dir else default_data_dir()
    spec = opts.job_store or os.environ.get("DISAGFUSION_JOB_STORE", "")
    store = open_job_store(spec, data_dir / _safe(gateway.config.pipeline))
    manager = JobManager(
        store,
        video_runner(gateway, opts.video_timeout_s),
        retention_s=opts.video_retention_s,
        max_active=opts.max_pending,
    )
    await manager.start()
    video_limits = video_limits_for(info, limits.served_model, limits.model_aliases)
    add_video_routes(app, manager, video_limits, bearer_auth(opts.api_key))
    where = "Redis" if spec.startswith("redis") else str(data_dir)
    log.info("video jobs in %s (finished videos kept %gs)", where, opts.video_retention_s)
    return manager, store


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "default"


async def run_gateway(opts: GatewayOptions) -> int:
    security.check_data_plane(opts.transport, opts.tls)
    # Before the Gateway exists: it makes its channels to the stages with the process's TLS.
    security.configure(opts.tls)
    try:
        return await _run(opts)
    finally:
        security.configure(None)


async def _run(opts: GatewayOptions) -> int:
    import grpc

    from disagfusion.worker.models import describe_model

    info = describe_model(opts.model, family=opts.family)
    name, limits = limits_for(opts.model, opts.max_images, opts.served_model_name, opts.family)
    first = "monolithic" if "monolithic" in opts.stage_addrs else "encoder"
    gateway = Gateway(
        GatewayConfig(
            model=name,
            limits=limits,
            first_stage=first,
            stage_addrs=opts.stage_addrs,
            result_address=f"{opts.advertise_host}:{opts.results_at}",
            pipeline=opts.pipeline,
            max_waiting=opts.max_waiting,
            max_pending=opts.max_pending,
            request_timeout_s=opts.request_timeout_s,
            api_key=opts.api_key,
            handoff_delay=opts.handoff_delay,
            video=info.is_video,
            transport=opts.transport,
            transport_options=opts.transport_options,
            slo=opts.slo,
        )
    )
    # One server per service: a server answers every service it has on every port.
    clients = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_GatewayServicer_to_server(GatewayGrpc(gateway), clients)
    results = grpc.aio.server(options=SERVER_OPTIONS)
    add_stage_servicer(gateway, results)  # results' bytes parsed without copies
    # mTLS on the result port only: clients are not pipeline members (see above).
    for server, port, tls in (
        (clients, opts.grpc_port, None),
        (results, opts.results_at, opts.tls),
    ):
        if security.add_port(server, f"{opts.host}:{port}", tls) == 0:
            raise OSError(f"cannot listen on {opts.host}:{port}")
    if opts.tls is not None:
        log.info("result port %d requires mTLS; client ports stay plaintext", opts.results_at)
    await clients.start()
    await results.start()
    gateway.start()
    app = build_http_app(gateway, opts.http_limits)
    jobs = await start_jobs(opts, gateway, app, info) if info.is_video else None
    runner = await start_site(app, opts.host, opts.port)
    log.info("gateway for %s on http://%s:%d", name, opts.host, opts.port)
    await wait_for_signal()
    if jobs is not None:
        # Running jobs are not failed: they stay in the store and resume at the
        # next start (of this gateway or, with Redis, another replica).
        manager, store = jobs
        await manager.close()
        await store.close()
    # Keep listening while draining: new requests get 503 + Retry-After, and
    # results for the accepted ones still arrive on the result port.
    log.info("gateway draining: %d accepted request(s) to finish", gateway.pending_count)
    if not await gateway.drain(opts.drain_timeout_s):
        log.warning(
            "drain timeout (%gs): answering %d request(s) with an error",
            opts.drain_timeout_s,
            gateway.pending_count,
        )
    await gateway.stop()  # fails whatever is left, explicitly
    await runner.cleanup()  # the handlers write those answers before the sockets close
    await clients.stop(1.0)
    await results.stop(1.0)
    return 0
