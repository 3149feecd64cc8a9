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
from typing import Any, Literal

from disagfusion.scheduling.builtin_profiles import BUILTIN_PREFIX
from disagfusion.worker.models import builtin

Family = Literal["unet", "mmdit"]

# Pipeline class -> family. Both families share the stage code in stages.py.
PIPELINE_FAMILIES: dict[str, Family] = {
    "StableDiffusionPipeline": "unet",  # SD 1.x and 2.x (epsilon or v-prediction)
    "StableDiffusion3Pipeline": "mmdit",
}
# Recognised but not served yet: say so instead of "unsupported".
_NOT_YET = {
    "FluxPipeline": "Flux packs latents and uses guidance embeddings; not supported yet",
    "StableDiffusionXLPipeline": "SDXL needs size/crop conditioning; not supported yet",
}
# The pipelines' own __call__ defaults, for checkpoints without our sidecar.
_FAMILY_DEFAULTS: dict[Family, tuple[int, float]] = {"unet": (50, 7.5), "mmdit": (28, 7.0)}
DEFAULT_MAX_SIZE = 2048
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class ModelSourceError(ValueError):
    """The model source cannot be resolved or is not a supported pipeline."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    path: str
    family: Family
    pipeline_class: str
    vae_scale_factor: int
    size_multiple: int  # width and height must be multiples of this (pixels)
    default_size: tuple[int, int]  # (width, height)
    max_size: int
    default_steps: int
    default_guidance: float


def describe_model(source: str, cache_dir: str | os.PathLike[str] | None = None) -> ModelInfo:
    """Describe `source`: `builtin:<name>`, a local diffusers dir, or a cached hub id."""
    path, name = resolve_source(source, cache_dir)
    return _describe_dir(path, name=name, source=source)


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
    if cls in _NOT_YET:
        raise ModelSourceError(f"{cls} in {path}: {_NOT_YET[cls]}")
    family = PIPELINE_FAMILIES.get(cls)
    if family is None:
        supported = ", ".join(PIPELINE_FAMILIES)
        raise ModelSourceError(
            f"unsupported pipeline class {cls} in {path}; supported: {supported}"
        )

    components = read_components(path)
    vae = _component_config(path, components, "vae")
    # Same formula as the pipelines' own __init__.
    vae_scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    if family == "unet":
        net = _component_config(path, components, "unet")
        # Each down block but the last halves the latents; whole multiples keep
        # the UNet's skip connections aligned without its resize fallback.
        multiple = vae_scale * 2 ** max(len(net.get("down_block_types", [])) - 1, 0)
    else:
        net = _component_config(path, components, "transformer")
        multiple = vae_scale * int(net.get("patch_size", 2))
    sample = net.get("sample_size", 64)
    sample_h, sample_w = (sample, sample) if isinstance(sample, int) else (sample[0], sample[1])

    steps, guidance = _FAMILY_DEFAULTS[family]
    max_size = DEFAULT_MAX_SIZE
    meta = builtin.read_sidecar(path)
    if meta is not None and meta.get("builder") == "disagfusion":
        steps = int(meta.get("default_steps", steps))
        guidance = float(meta.get("default_guidance", guidance))
        max_size = int(meta.get("max_size", max_size))
    return ModelInfo(
        name=name,
        source=source,
        path=str(path),
        family=family,
        pipeline_class=cls,
        vae_scale_factor=vae_scale,
        size_multiple=multiple,
        default_size=(int(sample_w) * vae_scale, int(sample_h) * vae_scale),
        max_size=max_size,
        default_steps=steps,
        default_guidance=guidance,
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
