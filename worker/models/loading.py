"""Resolve a model source and describe it from its JSON configs alone.

The gateway needs sizes, defaults and the family of a model but must not pay
for torch/diffusers, so everything here reads model_index.json and component
config.json files with plain json. Only building a missing builtin imports
torch (see builtin.py).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disagfusion.scheduling.builtin_profiles import BUILTIN_PREFIX
from disagfusion.worker.models import builtin
from disagfusion.worker.models.families import FAMILIES, Family, SizeRules, by_class, by_name

DEFAULT_MAX_SIZE = 2048
DEFAULT_MAX_FRAMES = 241  # Wan2.2 makes 5 s at 24 fps (121); leave room, not unbounded
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ModelSourceError(ValueError):
    """The model source cannot be resolved or is not a supported pipeline."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    path: str
    family: str  # a name in families.FAMILIES
    pipeline_class: str
    vae_scale_factor: int
    size_multiple: int  # width and height must be multiples of this (pixels)
    default_size: tuple[int, int]  # (width, height)
    max_size: int
    default_steps: int
    default_guidance: float
    # Video models: frames per clip are frame_step*k + 1 up to max_frames (0: images).
    frame_step: int = 0
    default_frames: int = 1
    max_frames: int = 1
    default_fps: int = 16
    reference: str = "refused"  # "required": image-to-video, a reference image per request
    components: tuple[str, ...] = ()

    @property
    def family_spec(self) -> Family:
        return FAMILIES[self.family].bind(self.components)

    @property
    def is_video(self) -> bool:
        return self.frame_step > 0

    @property
    def sizes(self) -> SizeRules:
        return SizeRules(self.vae_scale_factor, self.size_multiple, self.default_size)


def describe_model(
    source: str,
    cache_dir: str | os.PathLike[str] | None = None,
    family: str | None = None,
) -> ModelInfo:
    """Describe `source`: `builtin:<name>`, a local diffusers dir, or a cached hub id.

    `family` (a name, or None/"auto") is what the deployment expects; a model of
    another family is an error rather than a surprise at the first request.
    """
    path, name = resolve_source(source, cache_dir)
    info = _describe_dir(path, name=name, source=source)
    if family not in (None, "auto"):
        try:
            expected = by_name(family)
        except KeyError as exc:
            raise ModelSourceError(exc.args[0]) from None
        if expected.name != info.family:
            raise ModelSourceError(
                f"{source} is a {info.pipeline_class} (family {info.family}), "
                f"but family {family} ({expected.pipeline_class}) was asked for"
            )
    return info


def resolve_source(
    source: str, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, str]:
    """Return (pipeline dir, display name); builds a builtin if it is missing."""
    if source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        if name not in builtin.BUILTIN_NAMES:
            known = ", ".join(BUILTIN_PREFIX + n for n in builtin.BUILTIN_NAMES)
            raise ModelSourceError(f"unknown builtin model {source!r}; known: {known}")
        try:
            return builtin.ensure_builtin(name, cache_dir), name
        except OSError as exc:
            raise ModelSourceError(f"cannot build {source} in the model cache: {exc}") from exc
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelSourceError(f"model source {source!r} is a file, not a diffusers directory")
        return path.resolve(), path.resolve().name
    # A relative "org/name" is ambiguous; anything that can only be a path is not a hub id.
    if source.startswith(("/", ".", "~")) or not _HUB_ID.fullmatch(source):
        raise ModelSourceError(f"model directory {source!r} does not exist")
    return _hub_snapshot(source), source.rsplit("/", 1)[-1]


def _hub_snapshot(repo_id: str) -> Path:
    # Resolved through the local HF cache only: serving never downloads.
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, bad ids, broken cache
        raise ModelSourceError(
            f"model {repo_id!r} is not a local directory and is not in the local "
            f"Hugging Face cache (downloads are disabled): {exc}"
        ) from exc


def read_components(path: str | os.PathLike[str]) -> dict[str, tuple[str, str]]:
    """Components of a pipeline dir: name -> (library, class), absent ones left out."""
    index = _read_json(Path(path) / "model_index.json", "model_index.json")
    return {
        key: (value[0], value[1])
        for key, value in index.items()
        if not key.startswith("_")
        and isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, str) for v in value)
    }


def _describe_dir(path: Path, *, name: str, source: str) -> ModelInfo:
    if not (path / "model_index.json").is_file():
        raise ModelSourceError(
            f"{path} has no model_index.json: not a diffusers pipeline directory"
        )
    index = _read_json(path / "model_index.json", "model_index.json")
    cls = index.get("_class_name")
    if not isinstance(cls, str):
        raise ModelSourceError(f"{path}/model_index.json has no _class_name")
    family = by_class(cls)
    if family is None:
        supported = ", ".join(f"{f.pipeline_class} ({f.name})" for f in FAMILIES.values())
        raise ModelSourceError(
            f"unsupported pipeline class {cls} in {path}; supported: {supported}"
        )

    components = read_components(path)

    def config(component: str) -> dict[str, Any]:
        return _component_config(path, components, component)

    sizes = family.size_rules(config)
    default_size = sizes.default_size
    steps, guidance = family.serving_defaults(config)
    max_size = DEFAULT_MAX_SIZE
    frames, fps = family.default_frames, family.default_fps
    max_frames = DEFAULT_MAX_FRAMES if family.frame_step else 1
    meta = builtin.read_sidecar(path)
    if meta is not None and meta.get("builder") == "disagfusion":
        steps = int(meta.get("default_steps", steps))
        guidance = float(meta.get("default_guidance", guidance))
        max_size = int(meta.get("max_size", max_size))
        if "default_size" in meta:
            default_size = (int(meta["default_size"][0]), int(meta["default_size"][1]))
        frames = int(meta.get("default_frames", frames))
        fps = int(meta.get("default_fps", fps))
        max_frames = int(meta.get("max_frames", max_frames))
    return ModelInfo(
        name=name,
        source=source,
        path=str(path),
        family=family.name,
        pipeline_class=cls,
        vae_scale_factor=sizes.vae_scale_factor,
        size_multiple=sizes.size_multiple,
        default_size=default_size,
        max_size=max_size,
        default_steps=steps,
        default_guidance=guidance,
        frame_step=family.frame_step,
        default_frames=frames,
        max_frames=max_frames,
        default_fps=fps,
        reference=family.reference,
        components=tuple(components),
    )


def _component_config(
    path: Path, components: dict[str, tuple[str, str]], component: str
) -> dict[str, Any]:
    if component not in components:
        raise ModelSourceError(f"{path} has no {component} component in model_index.json")
    return _read_json(path / component / "config.json", f"{component}/config.json")


def _read_json(file: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise ModelSourceError(f"missing {what}: {file}") from exc
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot read {file}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelSourceError(f"{file} is not a JSON object")
    return data
