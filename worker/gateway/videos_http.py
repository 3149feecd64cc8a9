"""The OpenAI Videos API over HTTP: aiohttp routes in front of a JobManager.

``POST /v1/videos`` takes multipart form data (what the ``openai`` client sends,
the image as the file ``input_reference``) or, for curl users, a JSON object
(``input_reference`` then ``{"image_url": "data:image/png;base64,..."}``).
The app's ``client_max_size`` bounds the upload: a 1 MiB app refuses larger
reference images with a JSON 413, so serve videos from an app with more
(e.g. 16 MiB; :data:`SUGGESTED_CLIENT_MAX_SIZE`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from disagfusion.worker.gateway.api import ApiError, error_body
from disagfusion.worker.gateway.jobs import ContentUnavailable, JobError, JobManager, JobsFull
from disagfusion.worker.gateway.openapi import OPENAPI_VIDEOS
from disagfusion.worker.gateway.video_api import (
    VideoLimits,
    check_reference_image,
    parse_video_request,
    video_object,
)

log = logging.getLogger(__name__)

__all__ = ["SUGGESTED_CLIENT_MAX_SIZE", "Auth", "add_video_routes", "bearer_auth"]

# Returns the caller's owner id, or the response refusing the request (401).
Auth = Callable[[web.Request], str | web.Response]
SUGGESTED_CLIENT_MAX_SIZE = 16 << 20
_DATA_URL = re.compile(r"data:image/[a-z.+-]+;base64,(.*)", re.DOTALL)
_KINDS = {429: "rate_limit_error"}
_LIMIT = re.compile(r"[0-9]{1,3}")


def _error(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    kind = _KINDS.get(status, "invalid_request_error" if status < 500 else "server_error")
    return web.json_response(
        error_body(message, code=code, param=param, kind=kind), status=status, headers=headers
    )


def _api_error(err: ApiError) -> web.Response:
    return web.json_response(err.body(), status=err.status)


def _job_error(err: JobError) -> web.Response:
    headers = {}
    if isinstance(err, JobsFull):
        headers["Retry-After"] = str(err.retry_after_s)
    elif isinstance(err, ContentUnavailable):
        # Not ready, failed or expired: the openai client's quick retries would not help.
        headers["x-should-retry"] = "false"
    return _error(err.status, err.message, err.code, err.param, headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guarded(handler: Handler) -> Handler:
    """An unexpected error (a store that went away) still answers OpenAI-shaped JSON."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as err:
            log.exception("%s %s failed", request.method, request.path)
            return _error(500, f"internal error: {type(err).__name__}", "internal_error")

    return guarded


def bearer_auth(api_key: str | None) -> Auth:
    """``Authorization: Bearer <api_key>``; the owner is the key's sha256 ("" without a key)."""

    def auth(request: web.Request) -> str | web.Response:
        if not api_key:
            return ""
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return _error(
                401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key"
            )
        return hashlib.sha256(api_key.encode()).hexdigest()

    return auth


# ------------------------------------------------------------------------ request bodies


def _bad(param: str | None, message: str, code: str = "invalid_type") -> ApiError:
    return ApiError(400, message, code=code, param=param)


async def _form_fields(request: web.Request) -> tuple[dict[str, str], bytes | None]:
    try:
        form = await request.post()
    except (ValueError, LookupError) as err:  # no boundary, cut short, unknown charset, ...
        raise ApiError(
            400, f"The body is not valid form data: {err}"[:200], code="invalid_form"
        ) from None
    fields: dict[str, str] = {}
    reference = None
    for key in form:
        values = form.getall(key)
        if len(values) > 1:
            raise _bad(key[:64], f"Field {key[:64]!r} is given more than once.", "invalid_value")
        value = values[0]
        if key == "input_reference" and isinstance(value, web.FileField):
            reference = value.file.read()
        elif isinstance(value, str):
            fields[key] = value
        else:
            raise _bad(key[:64], f"Field {key[:64]!r} must be text, not a file.")
    return fields, reference


def _json_scalar(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise _bad(key[:64], f"Invalid {key[:64]!r}: expected a string or a number.")


def _data_url_image(value: object) -> bytes:
    url = value.get("image_url") if isinstance(value, dict) else None
    match = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if match is None:
        raise _bad(
            "input_reference",
            'Unsupported \'input_reference\': send {"image_url": "data:image/...;base64,..."}'
            " or upload the image as a multipart file (file ids and remote URLs are not served).",
            "unsupported_value",
        )
    try:
        return base64.b64decode(match[1], validate=True)
    except (binascii.Error, ValueError):
        raise _bad(
            "input_reference", "Invalid 'input_reference': the data URL is not valid base64."
        ) from None


async def _json_fields(request: web.Request) -> tuple[dict[str, str], bytes | None]:
    try:
        body = await request.json()
    except (ValueError, LookupError):  # LookupError: an unknown charset
        raise ApiError(400, "The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    reference = None
    fields: dict[str, str] = {}
    for key, value in body.items():
        if value is None:
            continue  # null means "use the default", as in the Images API
        if key == "input_reference":
            reference = _data_url_image(value)
        else:
            fields[key] = _json_scalar(key, value)
    return fields, reference


# ------------------------------------------------------------------------ query strings


def _list_query(query: Mapping[str, str]) -> tuple[str | None, int, str]:
    after = query.get("after") or None
    limit_text = query.get("limit", "20")
    # Not str.isdigit(): it takes digits int() refuses ("²") and others it reads ("٣").
    if not (_LIMIT.fullmatch(limit_text) and 1 <= int(limit_text) <= 100):
        raise _bad("limit", f"Invalid 'limit': {limit_text[:20]!r}; use 1 to 100.", "out_of_range")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise _bad(
            "order", f"Invalid 'order': {order[:20]!r}; use 'asc' or 'desc'.", "invalid_value"
        )
    return after, int(limit_text), order


def _variant(query: Mapping[str, str]) -> str:
    variant = query.get("variant", "video")
    if variant == "spritesheet":
        raise _bad(
            "variant",
            "Unsupported 'variant': 'spritesheet' is not served here; "
            "use 'video', 'thumbnail' or 'frames'.",
            "unsupported_value",
        )
    return variant  # others are checked by the manager


# ------------------------------------------------------------------------ routes


def add_video_routes(
    app: web.Application,
    manager: JobManager,
    limits: VideoLimits,
    auth: Auth,
    *,
    poll_after_ms: int = 1000,
) -> None:
    """Serve /v1/videos (create, list), /v1/videos/{video_id} (retrieve, delete)
    and /v1/videos/{video_id}/content from ``manager``."""
    app[OPENAPI_VIDEOS] = limits  # /openapi.json documents what is mounted

    def job_response(job_object: dict[str, Any]) -> web.Response:
        # The openai client's poll() waits this long between retrievals.
        return web.json_response(job_object, headers={"openai-poll-after-ms": str(poll_after_ms)})

    async def create(request: web.Request) -> web.Response:
        owner = auth(request)
        if isinstance(owner, web.Response):
            return owner
        try:
            if request.content_type == "application/json":
                fields, reference = await _json_fields(request)
            else:
                fields, reference = await _form_fields(request)
            if reference is not None:
                check_reference_image(reference)
            video_request = parse_video_request(fields, reference is not None, limits)
            job = await manager.create(owner, video_request, reference)
        except web.HTTPRequestEntityTooLarge:
            return _error(
                413,
                f"The request body is larger than this server's limit of "
                f"{request.client_max_size} bytes; send a smaller input_reference.",
                "too_large",
            )
        except ApiError as err:
            return _api_error(err)
        except JobError as err:
            return _job_error(err)
        return job_response(video_object(job))

    async def list_videos(request: web.Request) -> web.Response:
        owner = auth(request)
        if isinstance(owner, web.Response):
            return owner
        try:
            after, limit, order = _list_query(request.query)
            page = await manager.list(owner, after, limit, order)
        except ApiError as err:
            return _api_error(err)
        except JobError as err:
            return _job_error(err)
        return web.json_response(page)

    async def retrieve(request: web.Request) -> web.Response:
        owner = auth(request)
        if isinstance(owner, web.Response):
            return owner
        try:
            job = await manager.get(owner, request.match_info["video_id"])
        except JobError as err:
            return _job_error(err)
        return job_response(video_object(job))

    async def delete(request: web.Request) -> web.Response:
        owner = auth(request)
        if isinstance(owner, web.Response):
            return owner
        try:
            deleted = await manager.delete(owner, request.match_info["video_id"])
        except JobError as err:
            return _job_error(err)
        return web.json_response(deleted)

    async def content(request: web.Request) -> web.Response:
        owner = auth(request)
        if isinstance(owner, web.Response):
            return owner
        video_id = request.match_info["video_id"]
        try:
            data, content_type = await manager.content(owner, video_id, _variant(request.query))
        except ApiError as err:
            return _api_error(err)
        except JobError as err:
            return _job_error(err)
        extension = {"video/mp4": "mp4", "image/png": "png"}.get(content_type, "npy")
        disposition = f'attachment; filename="{video_id}.{extension}"'
        return web.Response(
            body=data, content_type=content_type, headers={"Content-Disposition": disposition}
        )

    app.router.add_post("/v1/videos", _guarded(create))
    app.router.add_get("/v1/videos", _guarded(list_videos))
    app.router.add_get("/v1/videos/{video_id}", _guarded(retrieve))
    app.router.add_delete("/v1/videos/{video_id}", _guarded(delete))
    app.router.add_get("/v1/videos/{video_id}/content", _guarded(content))
