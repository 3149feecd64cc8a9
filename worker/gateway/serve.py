"""`disagfusion gateway`: the gateway process, until SIGTERM.

On SIGTERM the gateway drains: new requests get 503 with Retry-After, the
accepted ones finish (or, past its drain timeout, are answered with an
explicit error), then it exits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.gateway.api import RequestLimits
from disagfusion.worker.gateway.service import Gateway, GatewayConfig, GatewayGrpc, build_http_app
from disagfusion.worker.probes import start_site
from disagfusion.worker.runtime.aio import wait_for_signal
from disagfusion.worker.runtime.peers import SERVER_OPTIONS
from disagfusion.worker.runtime.sender import HandoffDelay

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
    max_images: int = 4
    served_model_name: str | None = None
    drain_timeout_s: float = 60.0
    family: str = "auto"


def limits_for(
    model: str, max_images: int = 4, served_name: str | None = None, family: str = "auto"
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


async def run_gateway(opts: GatewayOptions) -> int:
    import grpc

    name, limits = limits_for(opts.model, opts.max_images, opts.served_model_name, opts.family)
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
    await wait_for_signal()
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
