"""The gateway: OpenAI Images API over HTTP (and gRPC Generate) in front of the stages.

It validates each request, admits it only while the pipeline has room
(otherwise 429 with Retry-After: backpressure instead of an unbounded queue),
hands it to the first stage with custody, and waits for the terminal result
that the last stage (or a failing stage) sends to its gRPC Stage service.
Every accepted request ends with images or an explicit error.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import torch
from aiohttp import web

from disagfusion.proto import disagfusion_pb2 as pb
from disagfusion.proto import disagfusion_pb2_grpc as pb_grpc
from disagfusion.worker.gateway.api import (
    ApiError,
    RequestLimits,
    error_body,
    images_response,
    parse_images_request,
)
from disagfusion.worker.gateway.limits import GatewayLimits, limits_middleware, too_large
from disagfusion.worker.gateway.openapi import add_openapi_route
from disagfusion.worker.gateway.slo import SloDeadlines
from disagfusion.worker.metrics import GatewayMetrics
from disagfusion.worker.params import GenerationParams
from disagfusion.worker.probes import add_probe_routes
from disagfusion.worker.runtime.payload import (
    Payload,
    PayloadError,
    payload_from,
    read_header,
)
from disagfusion.worker.runtime.peers import ChannelCache, PeerPool
from disagfusion.worker.runtime.sender import DeliveryFailed, HandoffDelay, Sender
from disagfusion.worker.runtime.senders import may_deliver_result
from disagfusion.worker.transport.base import DescriptorError, NotAccepted, TransferError
from disagfusion.worker.transport.wire import Transports, accept, fetch_tensors

log = logging.getLogger(__name__)

# Late results for requests that already ended are ignored; remember them a while.
ENDED_MEMORY = 10_000
CANCEL_TIMEOUT_S = 5.0  # per instance; the Progress check catches a Cancel that is lost


class RequestFailed(Exception):
    """A request that ends with an error: HTTP status and a message."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, object]:
        kind = "invalid_request_error" if 400 <= self.status < 500 else "server_error"
        if self.status == 429:
            kind = "rate_limit_error"
        return error_body(self.message, code=_ERROR_CODES.get(self.status, "error"), kind=kind)


_ERROR_CODES = {
    400: "invalid_request",
    429: "pipeline_full",
    500: "stage_failed",
    503: "not_ready",
    504: "deadline_exceeded",
}


@dataclass(frozen=True)
class GeneratedImages:
    request_id: str
    pngs: list[bytes]  # the images; of a video request, each video's first frame
    seeds: list[int]  # per image: the seed that reproduces it alone
    latency_s: float
    videos: list[bytes] = field(default_factory=list)  # MP4s, for a video model
    frames: list[torch.Tensor] = field(default_factory=list)  # with keep_frames: lossless


@dataclass
class GatewayConfig:
    model: str  # served model name (what `model` in a request must say)
    limits: RequestLimits
    first_stage: str  # "encoder", or "monolithic" for the baseline
    stage_addrs: dict[str, list[str]]  # every stage's instances, first_stage's included
    result_address: str  # where workers reach our Stage service (reply_to)
    pipeline: str = "local"
    max_waiting: int = 32  # accepted but not yet taken by the first stage
    max_pending: int = 512  # accepted and not yet answered
    request_timeout_s: float = 300.0
    api_key: str | None = None
    handoff_delay: HandoffDelay = field(default_factory=HandoffDelay)
    video: bool = False  # a video model: the Videos API serves it, not the Images API
    transport: str = "grpc"  # how results reach us (and prompts leave), where peers accept it
    transport_options: dict[str, str] = field(default_factory=dict)
    slo: str | None = None  # stamps SLO deadlines on requests (the stages' EDF order)


class Gateway(pb_grpc.StageServicer):
    def __init__(self, config: GatewayConfig, clock: Callable[[], float] = time.time) -> None:
        if config.first_stage not in config.stage_addrs:
            raise ValueError(f"no addresses for the first stage {config.first_stage!r}")
        self.config = config
        self.metrics = GatewayMetrics(config.pipeline, config.model)
        self._clock = clock
        self._slo = SloDeadlines(config.slo) if config.slo else None
        self._channels = ChannelCache()
        self.transports = Transports.open(config.transport, config.transport_options)
        self._pools = {
            stage: PeerPool(stage, addrs, self._channels, on_gone=self.transports.forget)
            for stage, addrs in config.stage_addrs.items()
        }
        self._sender = Sender(
            "gateway",
            self._channels,
            self.metrics.handoff,
            pool=self._pools[config.first_stage],
            delay=config.handoff_delay,
            on_failure=self._dispatch_failed,
            clock=clock,
            transports=self.transports,
        )
        self._pending: dict[str, asyncio.Future[GeneratedImages]] = {}
        self._started: dict[str, float] = {}
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._waiting = 0
        self._completions: collections.deque[float] = collections.deque(maxlen=256)
        self._seen_ready: set[str] = set()  # stages that have had a ready instance
        self._progress: dict[str, Callable[[float], None]] = {}
        self._cancels: set[asyncio.Task[None]] = set()
        self.draining = False

    # ---- lifecycle ------------------------------------------------------

    def start(self) -> None:
        for pool in self._pools.values():
            pool.start()

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait for the accepted ones; False on timeout."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._pending

    async def stop(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(
                    RequestFailed(
                        503,
                        "the gateway shut down before this request finished; retry it",
                        retry_after_s=5,
                    )
                )
        await self._sender.close()
        for pool in self._pools.values():
            await pool.stop()
        await self._channels.close()
        await self.transports.close()

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: shutting down"
        missing = [s for s, pool in self._pools.items() if pool.ready_count() == 0]
        self._seen_ready.update(s for s in self._pools if s not in missing)
        if missing:
            return False, "no ready instance of: " + ", ".join(missing)
        counts = ", ".join(f"{s}={p.ready_count()}" for s, p in self._pools.items())
        return True, f"ready instances: {counts}"

    def _admission_problem(self) -> RequestFailed | None:
        """Why a new request is refused now, if it is.

        A stage that has been ready once and has no ready instance right now is
        restarting (a crashed worker, a rolling update): requests are still
        admitted, within max_waiting, and custody delivers them once an instance
        is back. Only a stage never seen ready makes the pipeline "not ready"."""
        if self.draining:
            return RequestFailed(
                503, "the gateway is shutting down; retry on another instance", retry_after_s=5
            )
        ready, detail = self.readiness()
        if not ready and not self._seen_ready.issuperset(self._pools):
            return RequestFailed(503, f"pipeline not ready: {detail}", retry_after_s=5)
        if (
            self._waiting >= self.config.max_waiting
            or len(self._pending) >= self.config.max_pending
        ):
            return RequestFailed(
                429, "pipeline is full; retry later", retry_after_s=self._retry_after_s()
            )
        return None

    # ---- requests -------------------------------------------------------

    def _retry_after_s(self) -> int:
        """Seconds until the queue ahead has likely drained, from recent completions."""
        now = time.monotonic()
        recent = [t for t in self._completions if now - t < 60.0]
        if len(recent) < 2:
            return 1
        rate = (len(recent) - 1) / max(recent[-1] - recent[0], 1e-3)
        return max(1, min(60, math.ceil((self._waiting + 1) / rate)))

    async def generate(
        self,
        params: GenerationParams,
        request_id: str | None = None,
        *,
        from_client: bool = False,
        tensors: dict[str, torch.Tensor] | None = None,
        on_progress: Callable[[float], None] | None = None,
        timeout_s: float | None = None,
    ) -> GeneratedImages:
        """Run one request through the pipeline; raises RequestFailed.

        `request_id` names the request in the pipeline (default: a new one). A
        client's id (`from_client`, X-Request-Id) gets a unique suffix, since
        clients may reuse theirs and the stages suppress duplicates by id.
        `tensors` go to the first stage (an image-to-video reference image);
        `on_progress` hears the denoiser's progress, 0..1; `timeout_s` replaces
        the request timeout (a video job runs for minutes). Cancelling the
        caller's task cancels the request in the stages at their next step."""
        self.metrics.arrived(
            params.width,
            params.height,
            params.num_frames,
            params.num_inference_steps,
            params.num_images,
        )
        problem = self._admission_problem()
        if problem is not None:
            raise problem
        rid = request_id or uuid.uuid4().hex
        if from_client:
            rid = f"{rid}.{uuid.uuid4().hex[:12]}"
        timeout = timeout_s or self.config.request_timeout_s
        started = time.perf_counter()
        future: asyncio.Future[GeneratedImages] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        self._started[rid] = started
        if on_progress is not None:
            self._progress[rid] = on_progress
        self.metrics.pending.set(len(self._pending))
        payload = Payload(
            request_id=rid,
            params=params,
            tensors=dict(tensors or {}),
            deadline_unix=self._clock() + timeout,
            slo_deadline_unix=self._slo.deadline(self._clock(), params) if self._slo else 0.0,
            reply_to=self.config.result_address,
            pipeline=self.config.pipeline,
            model=self.config.model,
            source_stage="gateway",
        )
        dispatch = asyncio.create_task(self._dispatch(payload))
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout + 1.0)
        except TimeoutError:
            raise RequestFailed(504, f"no result within {timeout:g}s") from None
        finally:
            self._end(rid)
            if not dispatch.done():
                dispatch.cancel()
            if not future.done():  # timed out, or the caller went away: free the stages
                self._cancel_downstream(rid)

    def _cancel_downstream(self, rid: str) -> None:
        """Tell every stage instance to drop `rid` (queued, computing or in transit); the
        progress check at each step (Progress) stays the fallback for a lost Cancel."""
        task = asyncio.get_running_loop().create_task(self._send_cancels(rid))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _send_cancels(self, rid: str) -> None:
        addresses = [a for addrs in self.config.stage_addrs.values() for a in addrs]

        async def one(address: str) -> bool:
            try:
                reply = await self._channels.stub(address).Cancel(
                    pb.CancelRequest(request_id=rid), timeout=CANCEL_TIMEOUT_S
                )
            except grpc.RpcError as err:  # an instance that is not there holds nothing
                log.debug("cancel %s at %s: %s", rid, address, err)
                return False
            return bool(reply.held)

        held = await asyncio.gather(*(one(a) for a in addresses))
        self.metrics.cancelled(sum(held))
        log.info("cancelled %s in %d stage instance(s)", rid, sum(held))

    async def _dispatch(self, payload: Payload) -> None:
        self._waiting += 1
        self.metrics.waiting.set(self._waiting)
        try:
            await self._sender.hand_off(payload)
        except DeliveryFailed as failure:
            await self._dispatch_failed(payload, failure.code, failure.message)
        finally:
            self._waiting -= 1
            self.metrics.waiting.set(self._waiting)

    async def _dispatch_failed(self, payload: Payload, code: int, message: str) -> None:
        self._resolve(payload.failed(code, message, "gateway"))

    def _end(self, rid: str) -> None:
        self._pending.pop(rid, None)
        self._progress.pop(rid, None)
        self._started.pop(rid, None)
        self._ended[rid] = None
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        self.metrics.pending.set(len(self._pending))

    def _resolve(self, result: Payload) -> None:
        future = self._pending.get(result.request_id)
        if future is None or future.done():
            return  # late or duplicate result: the request already ended
        if result.error:
            future.set_exception(RequestFailed(result.error_code or 500, result.error))
            return
        video = "mp4.0" in result.tensors
        pngs = _numbered(result.tensors, "thumb" if video else "png")
        videos = _numbered(result.tensors, "mp4")
        frames = [
            result.tensors[f"frames.{i}"]
            for i in range(len(result.tensors))
            if f"frames.{i}" in result.tensors
        ]
        if len(pngs) != result.params.num_images or len(videos) != (len(pngs) if video else 0):
            future.set_exception(
                RequestFailed(
                    500,
                    f"{result.source_stage} returned {len(pngs)} images, "
                    f"expected {result.params.num_images}",
                )
            )
            return
        self._completions.append(time.monotonic())
        latency = time.perf_counter() - self._started.get(result.request_id, time.perf_counter())
        if self._slo is not None:
            self._slo.observe(result.params, latency)
            if result.slo_deadline_unix:
                self.metrics.slo(self._clock() <= result.slo_deadline_unix)
        future.set_result(
            GeneratedImages(
                result.request_id, pngs, result.params.image_seeds(), latency, videos, frames
            )
        )

    # ---- Stage service: terminal results from the last stage ---------------

    async def Health(self, request: pb.HealthRequest, context: object) -> pb.HealthReply:
        ready, _ = self.readiness()
        reply = pb.HealthReply(
            stage="gateway",
            model=self.config.model,
            ready=ready,
            queue_depth=self._waiting,
            in_flight=len(self._pending),
        )
        return self.transports.advertise(reply)

    async def Progress(self, request: pb.ProgressReport, context: object) -> pb.ProgressReply:
        """A stage's step count; a request that ended (answered, deleted, timed
        out) is cancelled, so the stage stops spending its accelerator on it."""
        if request.request_id not in self._pending:
            return pb.ProgressReply(cancelled=True)
        listener = self._progress.get(request.request_id)
        if listener is not None and request.total > 0:
            listener(min(request.step / request.total, 1.0))
        return pb.ProgressReply(cancelled=False)

    def _refusal(self, header: pb.WorkHeader) -> str:
        """Why a delivered result is ignored ("" when it is taken): not from a stage that
        may deliver it (senders.py), a request this gateway does not hold, or one it
        already answered."""
        if not may_deliver_result(header.source_stage, bool(header.error)):
            return "sender"
        future = self._pending.get(header.request_id)
        if future is None:
            return "answered" if header.request_id in self._ended else "unknown"
        return "answered" if future.done() else ""

    async def Submit(
        self, request_iterator: AsyncIterator[pb.WorkChunk], context: object
    ) -> AsyncIterator[pb.Ack]:
        started = time.perf_counter()
        stream = request_iterator.__aiter__()
        header = pb.WorkHeader()
        try:
            header = await read_header(stream)
            refused = self._refusal(header)
            if refused == "sender":
                self.metrics.refused_result("sender")
                yield pb.Ack(
                    request_id=header.request_id,
                    status=pb.Ack.REJECTED,
                    reason=f"results come from the last stage, not {header.source_stage!r}",
                )
                return
            if refused:
                self.metrics.refused_result(refused)
            else:
                backend = accept(self.transports, header)
                if backend.pushes:
                    yield pb.Ack(request_id=header.request_id, status=pb.Ack.FETCHING)
                result = payload_from(header, await fetch_tensors(backend, header, stream))
                self.metrics.handoff.received(
                    result.nbytes, time.perf_counter() - started, backend.name
                )
                self._resolve(result)
        except NotAccepted as err:
            yield pb.Ack(
                request_id=header.request_id,
                status=pb.Ack.REJECTED,
                reason=str(err),
                retryable=True,  # the sender asks Health again and sends what we take
            )
            return
        except (PayloadError, DescriptorError) as err:
            yield pb.Ack(
                request_id=header.request_id,
                status=pb.Ack.REJECTED,
                reason=f"invalid payload: {err}",
            )
            return
        except TransferError as err:
            yield pb.Ack(
                request_id=header.request_id,
                status=pb.Ack.REJECTED,
                reason=f"transfer failed: {err}",
                retryable=True,
            )
            return
        # Unknown ids and answered requests (ended here, or a replay): acknowledge so the
        # sender stops; they were counted above and change nothing.
        yield pb.Ack(request_id=header.request_id, status=pb.Ack.RECEIVED)
        yield pb.Ack(request_id=header.request_id, status=pb.Ack.DONE)


def _numbered(tensors: dict[str, torch.Tensor], prefix: str) -> list[bytes]:
    """The byte tensors `prefix.0`, `prefix.1`, ... of a result, in order."""
    return [
        bytes(tensors[f"{prefix}.{i}"].numpy().tobytes())
        for i in range(len(tensors))
        if f"{prefix}.{i}" in tensors
    ]


class GatewayGrpc(pb_grpc.GatewayServicer):
    """gRPC Generate, validated by the same rules as the HTTP API."""

    _STATUS = {
        400: grpc.StatusCode.INVALID_ARGUMENT,
        401: grpc.StatusCode.UNAUTHENTICATED,
        404: grpc.StatusCode.NOT_FOUND,
        429: grpc.StatusCode.RESOURCE_EXHAUSTED,
        503: grpc.StatusCode.UNAVAILABLE,
        504: grpc.StatusCode.DEADLINE_EXCEEDED,
    }

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateReply:
        body: dict[str, object] = {"prompt": request.prompt}
        if request.negative_prompt:
            body["negative_prompt"] = request.negative_prompt
        if request.n:
            body["n"] = request.n
        if request.size:
            body["size"] = request.size
        if request.model:
            body["model"] = request.model
        for name in ("seed", "num_inference_steps", "guidance_scale"):
            if request.HasField(name):
                body[name] = getattr(request, name)
        if self.gateway.config.video:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{self.gateway.config.model} is a video model: use POST /v1/videos",
            )
            raise AssertionError("unreachable")
        try:
            params = parse_images_request(body, self.gateway.config.limits)
            result = await self.gateway.generate(params)
        except ApiError as err:
            await context.abort(self._STATUS.get(err.status, grpc.StatusCode.UNKNOWN), err.message)
            raise AssertionError("unreachable") from None
        except RequestFailed as err:
            await context.abort(self._STATUS.get(err.status, grpc.StatusCode.INTERNAL), err.message)
            raise AssertionError("unreachable") from None
        return pb.GenerateReply(
            request_id=result.request_id,
            images=[
                pb.GeneratedImage(png=png, seed=seed)
                for png, seed in zip(result.pngs, result.seeds, strict=True)
            ],
            latency_s=result.latency_s,
        )


# A client's X-Request-Id is echoed and logged: keep it short and printable.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:~-]{1,128}")
REQUEST_ID = web.RequestKey("request_id", str)
FROM_CLIENT = web.RequestKey("request_id_from_client", bool)
MAX_BODY_MIB = web.AppKey("max_body_mib", int)


def _error(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(message, code=code, param=param), status=status)


@web.middleware
async def _request_ids_and_json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """X-Request-Id on every response (the client's, validated, or a new one), and
    OpenAI-shaped JSON for aiohttp's own errors (unknown path, wrong method)."""
    given = request.headers.get("X-Request-Id")
    if given is not None and not _REQUEST_ID.fullmatch(given):
        response: web.StreamResponse = _error(
            400,
            "Invalid 'X-Request-Id' header: use 1-128 characters of A-Z a-z 0-9 . _ : ~ -",
            "invalid_request_id",
            "X-Request-Id",
        )
        response.headers["X-Request-Id"] = uuid.uuid4().hex
        return response
    request_id = given or uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    request[FROM_CLIENT] = given is not None
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            response = _error(
                405,
                f"{request.method} is not allowed on {request.path}; use {allowed}",
                "method_not_allowed",
            )
            response.headers["Allow"] = allowed
        elif exc.status == 404:
            response = _error(404, f"No such path: {request.path}", "not_found")
        elif exc.status == 413:
            limit = request.app[MAX_BODY_MIB]
            response = _error(413, f"request body larger than {limit} MiB", "too_large")
        else:
            response = _error(exc.status, exc.reason, "http_error")
    response.headers["X-Request-Id"] = request_id
    return response


def build_http_app(
    gateway: Gateway,
    http_limits: GatewayLimits | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The OpenAI-style HTTP API; `http_limits` (default: GatewayLimits()) bounds what
    one client may ask (limits.py); `clock` drives the rate limit."""
    http_limits = http_limits or GatewayLimits()
    # A video job's reference image arrives in the body: allow it, not more.
    max_body = http_limits.body_bytes(gateway.config.video)
    app = web.Application(
        client_max_size=max_body,
        middlewares=[
            _request_ids_and_json_errors,
            limits_middleware(http_limits, api_key=gateway.config.api_key, clock=clock),
        ],
        handler_args=http_limits.handler_args(),
    )
    app[MAX_BODY_MIB] = max_body >> 20
    limits = gateway.config.limits
    created = int(time.time())

    async def generations(request: web.Request) -> web.Response:
        started = time.perf_counter()
        response = await _generations(request)
        gateway.metrics.observe(response.status, time.perf_counter() - started)
        return response

    async def _generations(request: web.Request) -> web.Response:
        key = gateway.config.api_key
        if key and request.headers.get("Authorization") != f"Bearer {key}":
            return _error(
                401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key"
            )
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return too_large(request)
        except (ValueError, UnicodeDecodeError):
            return _error(400, "body is not valid JSON", "invalid_json")
        except LookupError as err:  # Content-Type names a charset Python does not know
            return _error(400, f"body cannot be decoded: {err}", "invalid_json")
        if gateway.config.video:
            return _error(
                400,
                f"{gateway.config.model} is a video model: create a video job with"
                " POST /v1/videos (client.videos.create) instead",
                "video_model",
                "model",
            )
        try:
            params = parse_images_request(body, limits)
        except ApiError as err:
            return web.json_response(err.body(), status=err.status)
        try:
            result = await gateway.generate(
                params, request[REQUEST_ID], from_client=request[FROM_CLIENT]
            )
        except RequestFailed as err:
            headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s else None
            return web.json_response(err.body(), status=err.status, headers=headers)
        return web.json_response(images_response(int(time.time()), result.pngs, result.seeds))

    def model_card() -> dict[str, object]:
        return {
            "id": gateway.config.model,
            "object": "model",
            "created": created,
            "owned_by": "disagfusion",
        }

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [model_card()]})

    async def model(request: web.Request) -> web.Response:
        wanted = request.match_info["model"]
        if wanted != limits.served_model and wanted not in limits.model_aliases:
            return _error(
                404,
                f"The model {wanted!r} does not exist here; this server serves"
                f" {limits.served_model!r}.",
                "model_not_found",
                "model",
            )
        return web.json_response(model_card())

    app.router.add_post("/v1/images/generations", generations)
    app.router.add_get("/v1/models", models)
    # Hub ids contain a slash (org/name), local paths several.
    app.router.add_get("/v1/models/{model:.+}", model)
    add_probe_routes(app, gateway.metrics.registry, gateway.readiness)
    add_openapi_route(
        app,
        images=None if gateway.config.video else limits,
        auth=bool(gateway.config.api_key),
        http=http_limits,
    )
    return app
