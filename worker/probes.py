"""/healthz, /readyz and /metrics routes shared by workers and the gateway."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def add_probe_routes(
    app: web.Application, registry: CollectorRegistry, readiness: Callable[[], tuple[bool, str]]
) -> None:
    """Liveness answers while the event loop runs; readiness says why not."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, detail = readiness()
        return web.json_response({"ready": ready, "detail": detail}, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    # A client that disconnects cancels its handler: the gateway then cancels the
    # request in the stages instead of computing an answer nobody reads.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
