"""OpenAI Videos API request validation and response shaping (pure: stdlib only).

``POST /v1/videos`` arrives as multipart form data, so every field is a string:
:func:`parse_video_request` turns those strings into a :class:`VideoRequest` or
raises :class:`~disagfusion.worker.gateway.api.ApiError` (400, or 404 for an
unknown model) with OpenAI's error body. The codes are those of ``api.py``.

Duration rule. A clip of ``seconds`` at ``fps`` has ``num_frames`` = the largest
``frame_step * k + 1`` that is ``<= seconds * fps + 1`` (Wan: 4k+1; 4 s at
16 fps is 65 frames). An explicit ``num_frames`` wins over ``seconds``; with
neither, the model's ``default_frames``. The ``seconds`` reported back is the
value given, else ``str(round(num_frames / fps))``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from disagfusion.worker.gateway.api import (
    MAX_SEED,
    ApiError,
    random_seed,
    steps_and_guidance_problems,
)
from disagfusion.worker.models.families.base import MAX_REFERENCE_SIDE

if TYPE_CHECKING:
    from disagfusion.worker.gateway.jobs import Job

__all__ = [
    "VideoLimits",
    "VideoRequest",
    "check_reference_image",
    "parse_video_request",
    "video_object",
]

ReferencePolicy = Literal["required", "refused", "optional"]

_SIZE_RE = re.compile(r"([0-9]{1,9})[xX]([0-9]{1,9})")
_INT_RE = re.compile(r"[+-]?[0-9]{1,20}")
_NUMBER_RE = re.compile(r"[+-]?([0-9]{1,20}(\.[0-9]{0,20})?|\.[0-9]{1,20})([eE][+-]?[0-9]{1,3})?")
_TRUE, _FALSE = ("true", "1"), ("false", "0")
_MAX_SHOWN = 40  # characters of a user-supplied string echoed back in a message
_MAX_PARAM = 64  # characters of an unknown key echoed back in ``param``

KNOWN_FIELDS = frozenset(
    {
        # OpenAI's fields (input_reference is the uploaded file, passed separately)
        "prompt",
        "model",
        "seconds",
        "size",
        # our extensions
        "num_frames",
        "fps",
        "num_inference_steps",
        "guidance_scale",
        "negative_prompt",
        "seed",
        "keep_frames",
    }
)


@dataclass(frozen=True, kw_only=True)
class VideoLimits:
    """What the gateway serves; bounds and defaults for video requests.

    ``min_size`` of 0 means ``size_multiple``. Frame counts are
    ``frame_step * k + 1``. Inconsistent limits raise ``ValueError``.
    """

    served_model: str
    model_aliases: tuple[str, ...] = ()
    default_size: tuple[int, int]
    size_multiple: int
    max_size: int
    min_size: int = 0
    default_steps: int
    max_steps: int = 200
    default_guidance: float
    max_guidance: float = 50.0
    default_frames: int
    frame_step: int = 4
    max_frames: int
    default_fps: int
    max_fps: int = 60
    # image-to-video needs an input_reference; text-to-video refuses one
    reference: ReferencePolicy = "optional"
    max_prompt_chars: int = 4000

    def __post_init__(self) -> None:
        if self.min_size == 0:
            object.__setattr__(self, "min_size", self.size_multiple)
        problems = self._problems()
        if problems:
            raise ValueError("invalid VideoLimits: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        mult, lo, hi = self.size_multiple, self.min_size, self.max_size
        problems = []
        if not self.served_model:
            problems.append("served_model must be non-empty")
        if mult < 1:
            problems.append(f"size_multiple must be >= 1, got {mult}")
        elif lo < 1 or lo > hi or lo % mult or hi % mult:
            problems.append(
                f"need 1 <= min_size <= max_size, both multiples of {mult}; got {lo}, {hi}"
            )
        elif not all(self.size_ok(d) for d in self.default_size):
            problems.append(f"default_size {self.default_size} is outside the size limits")
        problems += steps_and_guidance_problems(
            self.default_steps, self.max_steps, self.default_guidance, self.max_guidance
        )
        if self.frame_step < 1:
            problems.append(f"frame_step must be >= 1, got {self.frame_step}")
        elif not (self.frames_ok(self.max_frames) and self.frames_ok(self.default_frames)):
            problems.append(
                f"need default_frames <= max_frames, both {self.frames_rule()}; "
                f"got {self.default_frames}, {self.max_frames}"
            )
        if not 1 <= self.default_fps <= self.max_fps:
            problems.append(
                f"need 1 <= default_fps <= max_fps; got {self.default_fps}, {self.max_fps}"
            )
        if self.reference not in ("required", "refused", "optional"):
            problems.append(f"reference must be required, refused or optional: {self.reference!r}")
        if self.max_prompt_chars < 1:
            problems.append(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        return problems

    def size_ok(self, side: int) -> bool:
        # even too: yuv420p subsamples chroma by 2 in each direction
        return (
            self.min_size <= side <= self.max_size
            and side % self.size_multiple == 0
            and side % 2 == 0
        )

    def size_rule(self) -> str:
        even = "" if self.size_multiple % 2 == 0 else " and even"
        return (
            f"'WIDTHxHEIGHT' with each side a multiple of {self.size_multiple}{even} "
            f"between {self.min_size} and {self.max_size}, e.g. "
            f"'{self.default_size[0]}x{self.default_size[1]}'"
        )

    def frames_ok(self, frames: int) -> bool:
        return 1 <= frames <= self.max_frames and (frames - 1) % self.frame_step == 0

    def frames_rule(self) -> str:
        return f"{self.frame_step}k+1 between 1 and {self.max_frames}"

    def frames_for(self, seconds: int, fps: int) -> int:
        """The duration rule (module docstring): largest step*k+1 <= seconds*fps+1."""
        return seconds * fps // self.frame_step * self.frame_step + 1

    def max_seconds(self, fps: int) -> int:
        """Longest whole duration at ``fps`` within max_frames (0: none fits)."""
        seconds = self.max_frames // fps + 1
        while seconds > 0 and self.frames_for(seconds, fps) > self.max_frames:
            seconds -= 1
        return seconds


@dataclass(frozen=True)
class VideoRequest:
    """One validated video-generation request: what a job needs to run."""

    prompt: str
    model: str  # the served model's name, whichever alias the request used
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    seconds: str  # as reported back in the Video object
    negative_prompt: str = ""
    keep_frames: bool = False

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


# --------------------------------------------------------------------------- helpers


def _show(value: str) -> str:
    if len(value) > _MAX_SHOWN:
        return repr(value[:_MAX_SHOWN]) + f"... ({len(value)} characters)"
    return repr(value)


def _bad(param: str, message: str, code: str, status: int = 400) -> ApiError:
    return ApiError(status, message, code=code, param=param)


def _param_name(key: str) -> str:
    return key[:_MAX_PARAM].encode("utf-8", "backslashreplace").decode("utf-8")


def _int(fields: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    text = fields.get(name)
    if text is None:
        return None
    if not _INT_RE.fullmatch(text.strip()):
        raise _bad(
            name,
            f"Invalid '{name}': expected an integer between {lo} and {hi}, got {_show(text)}.",
            "invalid_type",
        )
    value = int(text)
    if not lo <= value <= hi:
        raise _bad(
            name,
            f"Invalid '{name}': {text.strip()} is out of range; it must be between {lo} and {hi}.",
            "out_of_range",
        )
    return value


def _number(fields: Mapping[str, str], name: str, lo: float, hi: float) -> float | None:
    text = fields.get(name)
    if text is None:
        return None
    # The regex keeps out float()'s extras: nan, inf, underscores.
    if not _NUMBER_RE.fullmatch(text.strip()):
        raise _bad(
            name,
            f"Invalid '{name}': expected a number between {lo} and {hi}, got {_show(text)}.",
            "invalid_type",
        )
    value = float(text)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise _bad(
            name,
            f"Invalid '{name}': {text.strip()} is out of range; "
            f"it must be a number between {lo} and {hi}.",
            "out_of_range",
        )
    return value


def _text(fields: Mapping[str, str], name: str, max_chars: int) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    if len(value) > max_chars:
        raise _bad(
            name,
            f"Invalid '{name}': {len(value)} characters is too long; "
            f"the limit is {max_chars} characters.",
            "out_of_range",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(
            name, f"Invalid '{name}': the text is not valid Unicode.", "invalid_value"
        ) from None
    return value


def _bool(fields: Mapping[str, str], name: str) -> bool | None:
    text = fields.get(name)
    if text is None:
        return None
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise _bad(
        name, f"Invalid '{name}': expected true or false, got {_show(text)}.", "invalid_type"
    )


def _size(fields: Mapping[str, str], limits: VideoLimits) -> tuple[int, int]:
    text = fields.get("size")
    if text is None:
        return limits.default_size
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise _bad(
            "size",
            f"Invalid 'size': expected {limits.size_rule()}, got {_show(text)}.",
            "invalid_size",
        )
    width, height = int(match[1]), int(match[2])
    if not (limits.size_ok(width) and limits.size_ok(height)):
        raise _bad(
            "size",
            f"Invalid 'size': {width}x{height} is not allowed; expected {limits.size_rule()}.",
            "invalid_size",
        )
    return width, height


def _check_model(fields: Mapping[str, str], limits: VideoLimits) -> None:
    model = fields.get("model")
    if model is not None and model != limits.served_model and model not in limits.model_aliases:
        raise _bad(
            "model",
            f"The model {_show(model)} does not exist here; "
            f"this server serves {limits.served_model!r}.",
            "model_not_found",
            status=404,
        )


def _check_reference(has_reference: bool, limits: VideoLimits) -> None:
    if limits.reference == "required" and not has_reference:
        raise _bad(
            "input_reference",
            f"Missing 'input_reference': {limits.served_model!r} is an image-to-video model; "
            "upload the first frame as the 'input_reference' file.",
            "missing_field",
        )
    if limits.reference == "refused" and has_reference:
        raise _bad(
            "input_reference",
            f"Unsupported 'input_reference': {limits.served_model!r} is a text-to-video model "
            "and takes no reference image.",
            "unsupported_value",
        )


def _frames(
    fields: Mapping[str, str], limits: VideoLimits, fps: int, seconds: int | None
) -> tuple[int, str]:
    """(num_frames, seconds as reported) by the duration rule."""
    if "num_frames" in fields:
        frames = _int(fields, "num_frames", 1, limits.max_frames)
        if frames is None or not limits.frames_ok(frames):
            raise _bad(
                "num_frames",
                f"Invalid 'num_frames': {fields['num_frames'].strip()[:_MAX_SHOWN]} is not "
                f"{limits.frames_rule()} (the model makes {limits.frame_step}k+1 frames).",
                "invalid_value",
            )
    elif seconds is not None:
        frames = limits.frames_for(seconds, fps)
        if frames > limits.max_frames:
            longest = limits.max_seconds(fps)
            allowed = (
                f"at most {longest} at {fps} fps"
                if longest
                else f"none at {fps} fps; lower 'fps' or give 'num_frames'"
            )
            raise _bad(
                "seconds",
                f"Invalid 'seconds': {seconds} s at {fps} fps is {frames} frames, over the "
                f"limit of {limits.max_frames}; seconds allowed: {allowed}.",
                "out_of_range",
            )
    else:
        frames = limits.default_frames
    reported = str(seconds) if seconds is not None else str(round(frames / fps))
    return frames, reported


# ------------------------------------------------------------------------ public API


def parse_video_request(
    fields: Mapping[str, str],
    has_reference: bool,
    limits: VideoLimits,
    *,
    default_seed: Callable[[], int] = random_seed,
) -> VideoRequest:
    """Validate the text fields of ``POST /v1/videos`` (the upload itself is
    ``has_reference``). Raises :class:`ApiError` for every bad input."""
    for key in fields:
        if key not in KNOWN_FIELDS:
            if key == "input_reference":
                raise _bad(
                    key,
                    "Invalid 'input_reference': upload the image as a file part, not text.",
                    "invalid_type",
                )
            raise _bad(
                _param_name(key),
                f"Unknown field {_show(key)}. Accepted fields: "
                f"{', '.join(sorted(KNOWN_FIELDS | {'input_reference'}))}.",
                "unknown_field",
            )
    _check_model(fields, limits)
    prompt = _text(fields, "prompt", limits.max_prompt_chars)
    if prompt is None:
        raise _bad(
            "prompt", "Missing required field 'prompt' (a non-empty string).", "missing_field"
        )
    if not prompt.strip():
        raise _bad(
            "prompt",
            "Invalid 'prompt': it is empty or only whitespace; describe the video to generate.",
            "invalid_value",
        )
    _check_reference(has_reference, limits)
    width, height = _size(fields, limits)
    fps = _int(fields, "fps", 1, limits.max_fps) or limits.default_fps
    seconds = _int(fields, "seconds", 1, 10**9)
    num_frames, reported_seconds = _frames(fields, limits, fps, seconds)
    steps = _int(fields, "num_inference_steps", 1, limits.max_steps)
    guidance = _number(fields, "guidance_scale", 0.0, limits.max_guidance)
    seed = _int(fields, "seed", 0, MAX_SEED)
    return VideoRequest(
        prompt=prompt,
        model=limits.served_model,
        width=width,
        height=height,
        num_frames=num_frames,
        fps=fps,
        num_inference_steps=steps if steps is not None else limits.default_steps,
        guidance_scale=guidance if guidance is not None else float(limits.default_guidance),
        seed=seed if seed is not None else default_seed(),
        seconds=reported_seconds,
        negative_prompt=_text(fields, "negative_prompt", limits.max_prompt_chars) or "",
        keep_frames=bool(_bool(fields, "keep_frames")),
    )


_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def check_reference_image(data: bytes) -> None:
    """An ``input_reference`` must be a PNG, JPEG or WebP image (by its magic bytes)
    of at most MAX_REFERENCE_SIDE pixels a side (read from its header: nothing is
    decoded here), the most a stage takes."""
    if not data:
        raise _bad(
            "input_reference", "Invalid 'input_reference': the file is empty.", "invalid_value"
        )
    webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    if not (webp or data.startswith(_IMAGE_MAGIC)):
        raise _bad(
            "input_reference",
            "Invalid 'input_reference': expected a PNG, JPEG or WebP image.",
            "invalid_value",
        )
    width, height = _image_size(data)
    if max(width, height) > MAX_REFERENCE_SIDE:
        raise _bad(
            "input_reference",
            f"Invalid 'input_reference': the image is {width}x{height}; "
            f"at most {MAX_REFERENCE_SIDE} pixels a side are accepted.",
            "invalid_value",
        )


def _image_size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return int(width), int(height)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise _bad(
            "input_reference",
            "Invalid 'input_reference': the image header cannot be read.",
            "invalid_value",
        ) from None


def video_object(job: Job) -> dict[str, Any]:
    """OpenAI's Video object for a job."""
    request = job.request
    error = (
        {"code": job.error_code or "failed", "message": job.error_message or ""}
        if job.status == "failed"
        else None
    )
    return {
        "id": job.id,
        "object": "video",
        "created_at": int(job.created_at),
        "completed_at": None if job.completed_at is None else int(job.completed_at),
        "expires_at": None if job.expires_at is None else int(job.expires_at),
        "model": request.model,
        "progress": 100 if job.status == "completed" else max(0, min(99, job.progress)),
        "prompt": request.prompt,
        "seconds": request.seconds,
        "size": request.size,
        "status": job.status,
        "error": error,
        "remixed_from_video_id": None,
    }
