"""``GET /openapi.json``: an OpenAPI 3.1 document of the API this gateway serves.

Built from the same limits objects the validators enforce (RequestLimits,
VideoLimits, GatewayLimits) and their own helpers (``size_pattern``,
``frames_ok``, ``max_seconds``), so the bounds, enums and patterns here are the
ones requests are checked against. The Images operation is documented for an
image model, the Videos operations for a video model (when add_video_routes
mounts them); /v1/models always.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from disagfusion.worker.gateway.api import (
    IGNORED_ENUMS,
    IGNORED_RANGES,
    MAX_SEED,
    SERVED_RESPONSE_FORMATS,
    WHITESPACE,
    RequestLimits,
    image_sides,
    size_pattern,
)
from disagfusion.worker.gateway.limits import GatewayLimits
from disagfusion.worker.gateway.video_api import VideoLimits

__all__ = ["OPENAPI_VIDEOS", "add_openapi_route", "openapi_document"]

OPENAPI_VIDEOS = web.AppKey("openapi_videos", VideoLimits)
"""Set by add_video_routes: the Videos API's limits, for the document."""

Schema = dict[str, Any]
_JSON = "application/json"
_NOT_BLANK = f"[^{WHITESPACE}]"  # a prompt must have a character that is not whitespace


@dataclass(frozen=True)
class _Surface:
    images: RequestLimits | None
    auth: bool
    http: GatewayLimits


_SURFACE = web.AppKey("openapi_surface", _Surface)


def add_openapi_route(
    app: web.Application, *, images: RequestLimits | None, auth: bool, http: GatewayLimits
) -> None:
    """Serve the document at /openapi.json, built at the first request (so the
    Videos routes, mounted after build_http_app, are in it)."""
    app[_SURFACE] = _Surface(images, auth, http)
    cached: list[bytes] = []

    async def openapi(request: web.Request) -> web.Response:
        if not cached:
            surface = request.app[_SURFACE]
            document = openapi_document(
                images=surface.images,
                videos=request.app.get(OPENAPI_VIDEOS),
                auth=surface.auth,
                http=surface.http,
                max_body_bytes=request.client_max_size,
            )
            cached.append(json.dumps(document).encode())
        return web.Response(body=cached[0], content_type=_JSON)

    app.router.add_get("/openapi.json", openapi)


# ------------------------------------------------------------------------ building blocks


def _nullable(schema: Schema) -> Schema:
    """JSON ``null`` means "the default" for every optional field."""
    nullable = {**schema}
    if "enum" in schema:
        nullable["enum"] = [*schema["enum"], None]
    if "type" in schema:
        nullable["type"] = [schema["type"], "null"]
    return nullable


def _int(lo: int, hi: int, description: str = "") -> Schema:
    schema: Schema = {"type": "integer", "minimum": lo, "maximum": hi}
    return {**schema, "description": description} if description else schema


def _prompt(max_chars: int, what: str) -> Schema:
    return {
        "type": "string",
        "minLength": 1,
        "maxLength": max_chars,
        "pattern": _NOT_BLANK,
        "description": f"What to generate: {what}; not only whitespace.",
    }


def _models(served: str, aliases: tuple[str, ...]) -> Schema:
    return {
        "type": "string",
        "enum": [served, *aliases],
        "description": "The served model, by its id or one of its aliases.",
    }


def _error_response(description: str, retry_after: bool = False) -> Schema:
    response: Schema = {
        "description": description,
        "content": {_JSON: {"schema": {"$ref": "#/components/schemas/Error"}}},
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}},
    }
    if retry_after:
        response["headers"]["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    return response


def _ok(description: str, schema_name: str, **headers: Schema) -> Schema:
    return {
        "description": description,
        "content": {_JSON: {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}},
        "headers": {"X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}, **headers},
    }


def _responses(ok: Schema, *codes: str, auth: bool) -> Schema:
    responses: Schema = {"200": ok}
    for code in ("400", *(["401"] if auth else []), *codes, "429", "500", "503"):
        responses[code] = {"$ref": f"#/components/responses/{code}"}
    return dict(sorted(responses.items()))


def _components(auth: bool, http: GatewayLimits, max_body_bytes: int) -> Schema:
    rate = (
        f"at most {http.burst} requests at once and {http.rate_per_s:g} per second per client"
        if http.rate_per_s
        else "no per-client rate limit"
    )
    components: Schema = {
        "headers": {
            "X-Request-Id": {
                "description": "The request's id: the client's X-Request-Id, or a new one.",
                "required": True,
                "schema": {"type": "string"},
            },
            "Retry-After": {
                "description": "Seconds to wait before retrying.",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
            },
        },
        "responses": {
            "400": _error_response("The request is invalid; the message names the problem."),
            "401": _error_response("Missing or wrong API key (Authorization: Bearer ...)."),
            "404": _error_response("No such model or resource."),
            "409": _error_response("The video is not completed yet (or failed)."),
            "410": _error_response("The video's content has expired."),
            "413": _error_response(f"The request body is over {max_body_bytes} bytes."),
            "429": _error_response(
                f"Too many requests: {rate}, or the pipeline is full.", retry_after=True
            ),
            "500": _error_response("A stage failed on this request."),
            "503": _error_response(
                f"Not ready, shutting down, or serving {http.max_in_flight} requests already;"
                " see Retry-After when given."
            ),
            "504": _error_response("No result within the request timeout."),
        },
        "schemas": _schemas(),
    }
    if auth:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "The gateway's API key."}
        }
    return components


def _schemas() -> Schema:
    nullable_int = {"type": ["integer", "null"]}
    video_fields: Schema = {
        "id": {"type": "string"},
        "object": {"const": "video"},
        "created_at": {"type": "integer"},
        "completed_at": nullable_int,
        "expires_at": nullable_int,
        "model": {"type": "string"},
        "progress": _int(0, 100),
        "prompt": {"type": "string"},
        "seconds": {"type": "string"},
        "size": {"type": "string"},
        "status": {"enum": ["queued", "in_progress", "completed", "failed"]},
        "error": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                },
            ]
        },
        "remixed_from_video_id": {"type": "null"},
    }
    video = {"type": "object", "required": list(video_fields), "properties": video_fields}
    model = {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        },
        "ImagesResponse": {
            "type": "object",
            "required": ["created", "data"],
            "properties": {
                "created": {"type": "integer"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["b64_json", "seed"],
                        "properties": {
                            "b64_json": {"type": "string", "contentEncoding": "base64"},
                            "seed": _int(0, MAX_SEED, "The seed that reproduces this image."),
                        },
                    },
                },
            },
        },
        "Model": model,
        "ModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
            },
        },
        "Video": video,
        "VideoList": {
            "type": "object",
            "required": ["object", "data", "first_id", "last_id", "has_more"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": {"$ref": "#/components/schemas/Video"}},
                "first_id": {"type": ["string", "null"]},
                "last_id": {"type": ["string", "null"]},
                "has_more": {"type": "boolean"},
            },
        },
        "VideoDeleted": {
            "type": "object",
            "required": ["id", "object", "deleted"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "video.deleted"},
                "deleted": {"const": True},
            },
        },
    }


# ------------------------------------------------------------------------ Images API


def images_request_schema(limits: RequestLimits) -> Schema:
    """The body of POST /v1/images/generations, as parse_images_request checks it."""
    negative: Schema = {"type": "string", "maxLength": limits.max_prompt_chars}
    if limits.no_negative_prompt is not None:
        negative = {
            "type": "string",
            "maxLength": 0,
            "description": f"Not taken: {limits.no_negative_prompt}.",
        }
    optional: Schema = {
        "model": _models(limits.served_model, limits.model_aliases),
        "n": _int(1, limits.max_n, "Images to generate."),
        "size": {
            "type": "string",
            "pattern": size_pattern(image_sides(limits), auto=True),
            "description": limits.size_rule(),
        },
        "response_format": {"enum": list(SERVED_RESPONSE_FORMATS)},
        "seed": _int(0, MAX_SEED, "Seed of the first image; image i uses seed + i."),
        "num_inference_steps": _int(1, limits.max_steps, "Denoising steps."),
        "guidance_scale": {"type": "number", "minimum": 0, "maximum": limits.max_guidance},
        "negative_prompt": negative,
        "user": {"type": "string"},
        **{
            name: {"enum": list(served), "description": "OpenAI's; accepted, not used."}
            for name, (_, served) in IGNORED_ENUMS.items()
        },
        **{
            name: _int(lo, hi, "OpenAI's; accepted, not used.")
            for name, (lo, hi) in IGNORED_RANGES.items()
        },
        "stream": {"enum": [False], "description": "Streaming is not served."},
    }
    return {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            "prompt": _prompt(limits.max_prompt_chars, "the image"),
            **{name: _nullable(schema) for name, schema in optional.items()},
        },
    }


def _images_paths(limits: RequestLimits, auth: bool) -> Schema:
    return {
        "/v1/images/generations": {
            "post": {
                "operationId": "createImage",
                "summary": "Generate images (OpenAI Images API; PNG as b64_json only).",
                "tags": ["Images"],
                **_security(auth),
                "requestBody": {
                    "required": True,
                    "content": {_JSON: {"schema": {"$ref": "#/components/schemas/ImagesRequest"}}},
                },
                "responses": _responses(
                    _ok("The images.", "ImagesResponse"), "404", "413", "504", auth=auth
                ),
            }
        }
    }


# ------------------------------------------------------------------------ Videos API


def _seconds_rule(limits: VideoLimits) -> Schema:
    """``seconds`` without ``num_frames``: at most max_seconds(fps) (the duration rule)."""
    groups: dict[int, list[int]] = {}
    for fps in range(1, limits.max_fps + 1):
        groups.setdefault(limits.max_seconds(fps), []).append(fps)
    branches: list[Schema] = [
        {
            "required": ["fps"],
            "properties": {"fps": {"enum": fps_values}, "seconds": {"maximum": longest}},
        }
        for longest, fps_values in sorted(groups.items())
        if longest > 0
    ]
    default = limits.max_seconds(limits.default_fps)
    branches.append({"not": {"required": ["fps"]}, "properties": {"seconds": {"maximum": default}}})
    return {
        "if": {"required": ["seconds"], "not": {"required": ["num_frames"]}},
        "then": {"anyOf": branches},
    }


def video_request_schema(limits: VideoLimits) -> Schema:
    """The form fields of POST /v1/videos, as parse_video_request checks them."""
    frames = [f for f in range(1, limits.max_frames + 1) if limits.frames_ok(f)]
    sides = [s for s in range(limits.min_size, limits.max_size + 1) if limits.size_ok(s)]
    properties: Schema = {
        "prompt": _prompt(limits.max_prompt_chars, "the video"),
        "model": _models(limits.served_model, limits.model_aliases),
        "seconds": _int(
            1,
            10**9,
            f"Duration at fps; num_frames = the largest {limits.frame_step}k+1 <= seconds * fps"
            f" + 1, at most {limits.max_frames}.",
        ),
        "size": {
            "type": "string",
            "pattern": size_pattern(sides, auto=False),
            "description": limits.size_rule(),
        },
        "num_frames": {
            "type": "integer",
            "enum": frames,
            "description": f"{limits.frames_rule()}; wins over seconds.",
        },
        "fps": _int(1, limits.max_fps, f"Frame rate (default {limits.default_fps})."),
        "num_inference_steps": _int(1, limits.max_steps, "Denoising steps."),
        "guidance_scale": {"type": "number", "minimum": 0, "maximum": limits.max_guidance},
        "negative_prompt": {"type": "string", "maxLength": limits.max_prompt_chars},
        "seed": _int(0, MAX_SEED),
        "keep_frames": {
            # a form field is text: "true"/"false", and "1"/"0" too
            "enum": [True, False, 1, 0],
            "description": "Also keep the lossless frames (content variant 'frames').",
        },
    }
    required = ["prompt"]
    if limits.reference != "refused":
        properties["input_reference"] = {
            "type": "string",
            "contentMediaType": "application/octet-stream",
            "description": "The first frame: a PNG, JPEG or WebP file.",
        }
        if limits.reference == "required":
            required.append("input_reference")
    return {
        "type": "object",
        "required": required,
        "additionalProperties": False,
        "properties": properties,
        "allOf": [_seconds_rule(limits)],
    }


def _video_id() -> Schema:
    return {"name": "video_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _videos_paths(auth: bool) -> Schema:
    tags = {"tags": ["Videos"], **_security(auth)}
    video = _ok(
        "The video job.",
        "Video",
        **{
            "openai-poll-after-ms": {
                "description": "How long to wait before polling again.",
                "schema": {"type": "string"},
            }
        },
    )
    return {
        "/v1/videos": {
            "post": {
                "operationId": "createVideo",
                "summary": "Create a video job (OpenAI Videos API).",
                "description": "Multipart form data, the image as the file 'input_reference';"
                " curl users may send the same fields as a JSON object instead, the image as"
                ' {"image_url": "data:image/png;base64,..."}.',
                **tags,
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {"$ref": "#/components/schemas/VideoRequest"}
                        }
                    },
                },
                "responses": _responses(video, "404", "413", auth=auth),
            },
            "get": {
                "operationId": "listVideos",
                "summary": "Your video jobs, a cursor page.",
                **tags,
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": _int(1, 100)},
                    {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                ],
                "responses": _responses(_ok("A page of jobs.", "VideoList"), auth=auth),
            },
        },
        "/v1/videos/{video_id}": {
            "parameters": [_video_id()],
            "get": {
                "operationId": "retrieveVideo",
                "summary": "One video job.",
                **tags,
                "responses": _responses(video, "404", auth=auth),
            },
            "delete": {
                "operationId": "deleteVideo",
                "summary": "Cancel a video job and delete it with its content.",
                **tags,
                "responses": _responses(_ok("Deleted.", "VideoDeleted"), "404", auth=auth),
            },
        },
        "/v1/videos/{video_id}/content": {
            "parameters": [_video_id()],
            "get": {
                "operationId": "downloadVideoContent",
                "summary": "A completed job's MP4, thumbnail PNG or lossless frames (.npy).",
                **tags,
                "parameters": [
                    {
                        "name": "variant",
                        "in": "query",
                        "schema": {"enum": ["video", "thumbnail", "frames"]},
                    }
                ],
                "responses": _responses(
                    {
                        "description": "The content.",
                        "content": {
                            media: {"schema": {"type": "string"}}
                            for media in ("video/mp4", "image/png", "application/x-npy")
                        },
                    },
                    "404",
                    "409",
                    "410",
                    auth=auth,
                ),
            },
        },
    }


# ------------------------------------------------------------------------ the document


def _security(auth: bool) -> Schema:
    return {"security": [{"bearer": []}]} if auth else {}


def _models_paths() -> Schema:
    no_auth: Schema = {"security": []}  # the model list is public, with or without a key
    return {
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "summary": "The served model.",
                "tags": ["Models"],
                **no_auth,
                "responses": _responses(_ok("The models.", "ModelList"), auth=False),
            }
        },
        "/v1/models/{model}": {
            "get": {
                "operationId": "retrieveModel",
                "summary": "The served model, by its id or an alias.",
                "tags": ["Models"],
                **no_auth,
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": _responses(_ok("The model.", "Model"), "404", auth=False),
            }
        },
    }


def openapi_document(
    *,
    images: RequestLimits | None,
    videos: VideoLimits | None,
    auth: bool,
    http: GatewayLimits,
    max_body_bytes: int,
) -> Schema:
    """The OpenAPI 3.1 document for what is served: the Images API with ``images``,
    the Videos API with ``videos``, /v1/models always."""
    components = _components(auth, http, max_body_bytes)
    paths: Schema = {}
    if images is not None:
        components["schemas"]["ImagesRequest"] = images_request_schema(images)
        paths.update(_images_paths(images, auth))
    if videos is not None:
        components["schemas"]["VideoRequest"] = video_request_schema(videos)
        paths.update(_videos_paths(auth))
    paths.update(_models_paths())
    served = images.served_model if images else videos.served_model if videos else ""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "disagfusion gateway",
            "version": "1",
            "description": f"OpenAI-style API serving {served!r}. Every error body is"
            " OpenAI's {error: {message, type, param, code}}.",
        },
        "paths": paths,
        "components": components,
    }
