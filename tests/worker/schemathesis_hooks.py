"""Schemathesis hooks for tests/worker/test_schemathesis.py (loaded by `st run` through
SCHEMATHESIS_HOOKS): valid image requests are made cheap before they are sent.

A valid request may ask for 4 images of 512x512 in 200 steps, minutes on a CPU. The
run tests validation and responses, not throughput, so a positive case's steps, n and
size are lowered (staying inside the schema) before the call; invalid cases are sent as
generated.
"""

from __future__ import annotations

import re
from typing import Any

import schemathesis
from schemathesis import GenerationMode

_SIZE = re.compile(r"\s*0*([0-9]+)[xX]0*([0-9]+)\s*")
MAX_SIDE = 128


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    body = case.body
    if case.operation.method.upper() != "POST" or not isinstance(body, dict):
        return
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    if case.operation.path == "/v1/videos":
        # a clip of at most 5 frames: num_frames wins over seconds
        body["num_frames"] = min(body.get("num_frames", 5), 5)
    if isinstance(body.get("num_inference_steps"), int):
        body["num_inference_steps"] = min(body["num_inference_steps"], 2)
    if isinstance(body.get("n"), int):
        body["n"] = 1
    size = body.get("size")
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    if match is not None:
        width, height = int(match[1]), int(match[2])
        if width * height > MAX_SIDE * MAX_SIDE:
            body["size"] = f"{min(width, MAX_SIDE)}x{min(height, MAX_SIDE)}"
