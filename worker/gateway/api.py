"""OpenAI Images API request validation and response shaping (pure: stdlib only).

The gateway decodes the JSON body of ``POST /v1/images/generations`` and hands it
to :func:`parse_images_request`, which either returns a validated
:class:`~disagfusion.worker.params.GenerationParams` or raises :class:`ApiError`
carrying the HTTP status and OpenAI's error body. No other exception escapes for
any input, so the gateway can map ``ApiError`` straight onto a response.

Error codes (``ApiError.code``):

* ``invalid_json``      - the body is not a JSON object.
* ``unknown_field``     - a key that is neither an OpenAI field nor one of our extensions.
* ``missing_field``     - ``prompt`` is absent or null.
* ``invalid_type``      - a field has the wrong JSON type.
* ``invalid_value``     - a value outside the field's OpenAI enumeration, an empty
  prompt, or text that is not valid Unicode.
* ``unsupported_value`` - a value OpenAI allows that this server does not serve
  (``response_format: "url"``, ``stream: true``, jpeg/webp, transparent background).
* ``invalid_size``      - ``size`` is malformed or outside the served limits.
* ``out_of_range``      - a number or a text length outside its bounds.
* ``model_not_found``   - ``model`` names a model other than the served one or one of its
  aliases (HTTP 404).

JSON ``null`` for an optional field means "use the default", as in OpenAI's API.
"""

from __future__ import annotations

import base64
import math
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from disagfusion.worker.params import GenerationParams

__all__ = [
    "IGNORED_ENUMS",
    "IGNORED_RANGES",
    "MAX_SEED",
    "SERVED_RESPONSE_FORMATS",
    "WHITESPACE",
    "ApiError",
    "RequestLimits",
    "error_body",
    "image_sides",
    "images_response",
    "parse_images_request",
    "parse_size",
    "random_seed",
    "size_pattern",
]

MAX_SEED = 2**63 - 1
"""Largest seed accepted from a request (fits a signed 64-bit proto/torch field)."""

_DEFAULT_SEED_BOUND = 2**31
_SIZE_RE = re.compile(r"([0-9]+)[xX]([0-9]+)")
_MAX_SIDE_DIGITS = 9  # more digits is refused before int() (slow or raising on huge strings)

# The characters str.strip() removes (str.isspace), spelled out so that a schema
# pattern built from it means the same to every regex engine (ECMA's \s differs).
WHITESPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
"""A regex character-class body: exactly Python's whitespace."""
_MAX_SHOWN = 40  # characters of a user-supplied string echoed back in a message
_MAX_PARAM = 64  # characters of an unknown key echoed back in ``param``

_QUALITIES = ("auto", "standard", "hd", "low", "medium", "high")
_STYLES = ("vivid", "natural")
_OUTPUT_FORMATS = ("png", "jpeg", "webp")
_BACKGROUNDS = ("auto", "opaque", "transparent")
_MODERATIONS = ("auto", "low")
_RESPONSE_FORMATS = ("b64_json", "url")
SERVED_RESPONSE_FORMATS = ("b64_json",)

# OpenAI fields validated and then ignored: name -> (OpenAI's values, those served) ...
IGNORED_ENUMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "quality": (_QUALITIES, _QUALITIES),
    "style": (_STYLES, _STYLES),
    "output_format": (_OUTPUT_FORMATS, ("png",)),
    "background": (_BACKGROUNDS, ("auto", "opaque")),
    "moderation": (_MODERATIONS, _MODERATIONS),
}
# ... and name -> (lowest, highest) integer.
IGNORED_RANGES = {"output_compression": (0, 100), "partial_images": (0, 3)}

# Fields we validate and use, then OpenAI fields we validate and ignore.
_KNOWN_FIELDS = frozenset(
    {
        "prompt",
        "model",
        "n",
        "size",
        "response_format",
        "seed",
        "num_inference_steps",
        "guidance_scale",
        "negative_prompt",
        "user",
        "quality",
        "style",
        "output_format",
        "background",
        "moderation",
        "output_compression",
        "partial_images",
        "stream",
    }
)


def error_body(
    message: str, *, code: str, param: str | None = None, kind: str = "invalid_request_error"
) -> dict[str, Any]:
    """OpenAI's error shape: the one body every error of the gateway answers with."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(ValueError):
    """A request the gateway rejects, with its HTTP status and OpenAI error body.

    A ``ValueError`` subclass (so also an ``Exception``), which lets
    :func:`parse_size` serve directly as an ``argparse`` ``type=`` converter.
    """

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        """OpenAI's error shape, ready to serialise as the response body."""
        return error_body(self.message, code=self.code, param=self.param)

    def __repr__(self) -> str:
        return (
            f"ApiError(status={self.status}, code={self.code!r}, "
            f"param={self.param!r}, message={self.message!r})"
        )


def steps_and_guidance_problems(
    default_steps: int, max_steps: int, default_guidance: float, max_guidance: float
) -> list[str]:
    """What is inconsistent in step and guidance limits (images and videos alike)."""
    problems = []
    if not 1 <= default_steps <= max_steps:
        problems.append(f"need 1 <= default_steps <= max_steps; got {default_steps}, {max_steps}")
    if not (math.isfinite(max_guidance) and 0 <= default_guidance <= max_guidance):
        problems.append(
            "need 0 <= default_guidance <= max_guidance (finite); "
            f"got {default_guidance}, {max_guidance}"
        )
    return problems


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """What the gateway serves; bounds and defaults for request validation.

    ``min_size`` of 0 (the default) means ``size_multiple``. ``min_size`` and
    ``max_size`` bound each of width and height and must be multiples of
    ``size_multiple``. Inconsistent limits raise ``ValueError`` at construction:
    that is a configuration error, not a request error.
    """

    served_model: str
    # Other names a request's `model` may use: the source the server was started
    # with (builtin name, local path, hub id) and the model's display name.
    model_aliases: tuple[str, ...] = ()
    default_size: tuple[int, int]
    size_multiple: int
    max_size: int
    min_size: int = 0
    default_steps: int
    max_steps: int = 200
    default_guidance: float
    max_guidance: float = 50.0
    max_n: int = 4
    max_prompt_chars: int = 4000
    # Why this model takes no negative prompt (e.g. guidance-distilled FLUX.1), or
    # None when it takes one.
    no_negative_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.min_size == 0:
            object.__setattr__(self, "min_size", self.size_multiple)
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
        elif any(d < lo or d > hi or d % mult for d in self.default_size):
            problems.append(f"default_size {self.default_size} is outside the size limits")
        problems += steps_and_guidance_problems(
            self.default_steps, self.max_steps, self.default_guidance, self.max_guidance
        )
        if self.max_n < 1:
            problems.append(f"max_n must be >= 1, got {self.max_n}")
        if self.max_prompt_chars < 1:
            problems.append(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if problems:
            raise ValueError("invalid RequestLimits: " + "; ".join(problems))

    def size_rule(self) -> str:
        """Human-readable description of the accepted sizes."""
        return (
            f"'WIDTHxHEIGHT' with each side a multiple of {self.size_multiple} "
            f"between {self.min_size} and {self.max_size}, or 'auto' "
            f"(= {self.default_size[0]}x{self.default_size[1]})"
        )


def random_seed() -> int:
    """Default seed for requests without one: uniform in [0, 2**31)."""
    return secrets.randbelow(_DEFAULT_SEED_BOUND)


# --------------------------------------------------------------------------- helpers


def _show(value: object) -> str:
    """Describe a user-supplied value safely (bounded length, never raises)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        if len(value) > _MAX_SHOWN:
            return repr(value[:_MAX_SHOWN]) + f"... ({len(value)} characters)"
        return repr(value)
    if isinstance(value, int):
        # str() of a huge int is slow and may raise (sys.int_info.str_digits_check_threshold).
        return str(value) if value.bit_length() <= 128 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a value of type {type(value).__name__}"


def _choices(options: tuple[str, ...]) -> str:
    return ", ".join(repr(o) for o in options)


def _bad(param: str, message: str, code: str, status: int = 400) -> ApiError:
    return ApiError(status, message, code=code, param=param)


def _int_field(value: object, name: str, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON's 2.0 is the integer 2 (and JSON Schema's "integer")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(
            name,
            f"Invalid '{name}': expected an integer between {lo} and {hi}, got {_show(value)}.",
            "invalid_type",
        )
    if not lo <= value <= hi:
        raise _bad(
            name,
            f"Invalid '{name}': {_show(value)} is out of range; it must be between {lo} and {hi}.",
            "out_of_range",
        )
    return value


def _number_field(value: object, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(
            name,
            f"Invalid '{name}': expected a number between {lo} and {hi}, got {_show(value)}.",
            "invalid_type",
        )
    # int/float comparisons are exact in Python, so huge ints compare safely
    # before float() could overflow; NaN fails both comparisons.
    if (isinstance(value, float) and not math.isfinite(value)) or not lo <= value <= hi:
        raise _bad(
            name,
            f"Invalid '{name}': {_show(value)} is out of range; "
            f"it must be a finite number between {lo} and {hi}.",
            "out_of_range",
        )
    return float(value)


def _str_field(value: object, name: str, max_chars: int | None = None) -> str:
    if not isinstance(value, str):
        raise _bad(
            name, f"Invalid '{name}': expected a string, got {_show(value)}.", "invalid_type"
        )
    if max_chars is not None and len(value) > max_chars:
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
            name,
            f"Invalid '{name}': the text contains unpaired surrogate characters "
            "and is not valid Unicode.",
            "invalid_value",
        ) from None
    return value


def _enum_field(value: object, name: str, allowed: tuple[str, ...], served: tuple[str, ...]) -> str:
    """A string from OpenAI's enumeration ``allowed``, of which we serve ``served``."""
    if not isinstance(value, str):
        raise _bad(
            name,
            f"Invalid '{name}': expected one of {_choices(served)}, got {_show(value)}.",
            "invalid_type",
        )
    if value in served:
        return value
    if value in allowed:
        raise _bad(
            name,
            f"Unsupported '{name}': {_show(value)} is not served here; use {_choices(served)}.",
            "unsupported_value",
        )
    raise _bad(
        name,
        f"Invalid '{name}': {_show(value)} is not one of {_choices(served)}.",
        "invalid_value",
    )


def _param_name(key: str) -> str:
    """An unknown key, bounded and made safe to echo back as ``param``."""
    return key[:_MAX_PARAM].encode("utf-8", "backslashreplace").decode("utf-8")


# ------------------------------------------------------------------------ public API


def parse_size(text: object, limits: RequestLimits | None = None) -> tuple[int, int]:
    """Parse ``"WIDTHxHEIGHT"`` into ``(width, height)``.

    Surrounding whitespace is ignored and ``X`` works like ``x``. Without
    ``limits`` only the syntax and positivity are checked (for the CLI). With
    ``limits``, ``"auto"`` means ``limits.default_size`` and each side must be a
    multiple of ``limits.size_multiple`` within ``[min_size, max_size]``.
    Raises :class:`ApiError` (code ``invalid_size``/``invalid_type``, param
    ``size``), which is a ``ValueError``.
    """
    rule = limits.size_rule() if limits else "'WIDTHxHEIGHT', e.g. '512x512'"
    if not isinstance(text, str):
        raise _bad("size", f"Invalid 'size': expected {rule}, got {_show(text)}.", "invalid_type")
    stripped = text.strip()
    if limits is not None and stripped == "auto":
        return limits.default_size
    match = _SIZE_RE.fullmatch(stripped)
    # Bound the digit count: int() of a very long digit string is slow or raises.
    if match is None or len(match[1]) > _MAX_SIDE_DIGITS or len(match[2]) > _MAX_SIDE_DIGITS:
        raise _bad("size", f"Invalid 'size': expected {rule}, got {_show(text)}.", "invalid_size")
    width, height = int(match[1]), int(match[2])
    if limits is None:
        if width < 1 or height < 1:
            raise _bad(
                "size",
                f"Invalid 'size': {_show(text)} has a zero side; both sides must be positive.",
                "invalid_size",
            )
        return width, height
    for side in (width, height):
        if side % limits.size_multiple or not limits.min_size <= side <= limits.max_size:
            raise _bad(
                "size",
                f"Invalid 'size': {width}x{height} is not allowed; expected {rule}.",
                "invalid_size",
            )
    return width, height


def size_pattern(sides: Iterable[int], *, auto: bool) -> str:
    """A regex matching exactly the ``size`` strings the parsers accept with these
    ``sides``: surrounding whitespace, ``x`` or ``X``, leading zeros up to 9 digits a
    side, and ``"auto"`` when ``auto`` (the OpenAPI document's ``pattern``)."""
    numbers = "|".join(f"0{{0,{_MAX_SIDE_DIGITS - len(str(s))}}}{s}" for s in sorted(set(sides)))
    choice = f"(?:{numbers})[xX](?:{numbers})"
    if auto:
        choice = f"auto|{choice}"
    return f"^[{WHITESPACE}]*(?:{choice})[{WHITESPACE}]*$"


def image_sides(limits: RequestLimits) -> range:
    """Every width (and height) ``limits`` accept."""
    return range(limits.min_size, limits.max_size + 1, limits.size_multiple)


def parse_images_request(
    body: object,
    limits: RequestLimits,
    *,
    default_seed: Callable[[], int] = random_seed,
) -> GenerationParams:
    """Validate a decoded ``POST /v1/images/generations`` body.

    Returns the generation parameters with defaults filled from ``limits``
    (``default_seed()`` supplies the seed when none is given). Raises
    :class:`ApiError` (status 400, or 404 for an unknown model) for every bad
    input, and no other exception.
    """
    if not isinstance(body, dict):
        raise ApiError(
            400,
            f"The request body must be a JSON object, got {_show(body)}.",
            code="invalid_json",
        )

    for key in body:
        if not isinstance(key, str):
            raise ApiError(
                400, f"Field names must be strings, got {_show(key)}.", code="unknown_field"
            )
        if key not in _KNOWN_FIELDS:
            raise _bad(
                _param_name(key),
                f"Unknown field {_show(key)}. Accepted fields: {', '.join(sorted(_KNOWN_FIELDS))}.",
                "unknown_field",
            )

    def get(name: str) -> object:
        return body.get(name)

    model = get("model")
    if model is not None:
        if not isinstance(model, str):
            raise _bad(
                "model",
                f"Invalid 'model': expected a string, got {_show(model)}.",
                "invalid_type",
            )
        if model != limits.served_model and model not in limits.model_aliases:
            raise _bad(
                "model",
                f"The model {_show(model)} does not exist here; "
                f"this server serves {limits.served_model!r}.",
                "model_not_found",
                status=404,
            )

    prompt = get("prompt")
    if prompt is None:
        raise _bad(
            "prompt", "Missing required field 'prompt' (a non-empty string).", "missing_field"
        )
    prompt = _str_field(prompt, "prompt", limits.max_prompt_chars)
    if not prompt.strip():
        raise _bad(
            "prompt",
            "Invalid 'prompt': it is empty or only whitespace; describe the image to generate.",
            "invalid_value",
        )

    negative = get("negative_prompt")
    if negative not in (None, "") and limits.no_negative_prompt is not None:
        raise _bad(
            "negative_prompt",
            f"Unsupported 'negative_prompt': {limits.no_negative_prompt}.",
            "unsupported_value",
        )
    negative_prompt = (
        "" if negative is None else _str_field(negative, "negative_prompt", limits.max_prompt_chars)
    )

    n = get("n")
    num_images = 1 if n is None else _int_field(n, "n", 1, limits.max_n)

    size = get("size")
    width, height = limits.default_size if size is None else parse_size(size, limits)

    response_format = get("response_format")
    if response_format is not None:
        _enum_field(response_format, "response_format", _RESPONSE_FORMATS, SERVED_RESPONSE_FORMATS)

    seed_value = get("seed")
    seed = default_seed() if seed_value is None else _int_field(seed_value, "seed", 0, MAX_SEED)

    steps = get("num_inference_steps")
    num_inference_steps = (
        limits.default_steps
        if steps is None
        else _int_field(steps, "num_inference_steps", 1, limits.max_steps)
    )

    guidance = get("guidance_scale")
    guidance_scale = (
        float(limits.default_guidance)
        if guidance is None
        else _number_field(guidance, "guidance_scale", 0.0, limits.max_guidance)
    )

    _check_ignored_fields(get)

    return GenerationParams(
        prompt=prompt,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        num_images=num_images,
    )


def _check_ignored_fields(get: Callable[[str], object]) -> None:
    """Validate OpenAI fields that do not change what we generate."""
    user = get("user")
    if user is not None:
        _str_field(user, "user")
    for name, (allowed, served) in IGNORED_ENUMS.items():
        value = get(name)
        if value is not None:
            _enum_field(value, name, allowed, served)
    for name, (lo, hi) in IGNORED_RANGES.items():
        value = get(name)
        if value is not None:
            _int_field(value, name, lo, hi)
    stream = get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            raise _bad(
                "stream",
                f"Invalid 'stream': expected a boolean, got {_show(stream)}.",
                "invalid_type",
            )
        if stream:
            raise _bad(
                "stream",
                "Unsupported 'stream': streaming is not served here; omit it or send false.",
                "unsupported_value",
            )


def images_response(created: int, pngs: list[bytes], seeds: list[int]) -> dict[str, Any]:
    """OpenAI's images response: ``{"created", "data": [{"b64_json", "seed"}]}``.

    ``seed`` per item is a non-standard extension (the seed that reproduces that
    image); OpenAI clients ignore unknown keys. ``revised_prompt`` and ``url``
    are omitted: we never rewrite prompts and serve only ``b64_json``.
    """
    if len(pngs) != len(seeds):
        raise ValueError(f"got {len(pngs)} images but {len(seeds)} seeds")
    return {
        "created": created,
        "data": [
            {"b64_json": base64.b64encode(png).decode("ascii"), "seed": seed}
            for png, seed in zip(pngs, seeds, strict=True)
        ],
    }
