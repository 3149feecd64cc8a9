"""Client side of `disagfusion generate`: over HTTP, or the in-process baseline."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any


class ClientError(Exception):
    """The server (or the request) said no; the message says why."""


def post_json(
    url: str, body: dict[str, Any], timeout_s: float = 600.0, api_key: str | None = None
) -> tuple[int, Any]:
    """POST JSON; returns (status, decoded body) for any HTTP status."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"error": {"message": raw.decode(errors="replace")}}


def api_base(url: str) -> str:
    """The server's root: OpenAI clients put /v1 in the base URL, we add it ourselves."""
    return url.rstrip("/").removesuffix("/v1")


def generate_remote(base_url: str, body: dict[str, Any], api_key: str | None = None) -> list[bytes]:
    url = api_base(base_url) + "/v1/images/generations"
    try:
        status, reply = post_json(url, body, api_key=api_key)
    except (urllib.error.URLError, OSError) as err:
        raise ClientError(
            f"cannot reach {url}: {err}. Is `disagfusion serve --local` running?"
        ) from None
    if status != 200:
        message = reply.get("error", {}).get("message", reply) if isinstance(reply, dict) else reply
        raise ClientError(f"HTTP {status}: {message}")
    return [base64.b64decode(item["b64_json"]) for item in reply["data"]]


def generate_in_process(model: str, body: dict[str, Any]) -> list[bytes]:
    """The monolithic baseline: the whole diffusers pipeline in this process."""
    from disagfusion.worker.gateway.api import ApiError, parse_images_request
    from disagfusion.worker.gateway.serve import limits_for
    from disagfusion.worker.models import images_to_png, load_stage

    _, limits = limits_for(model)
    try:
        params = parse_images_request(body, limits)
    except ApiError as err:
        raise ClientError(f"{err.param or 'request'}: {err.message}") from None
    stage = load_stage("monolithic", model)
    return images_to_png(stage.run(params, {})["images"])
