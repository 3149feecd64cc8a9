"""The builtin tiny random-weight models, built offline and cached on disk.

There is no model hub here, so the builtins are built from configs with a fixed
seed and saved as ordinary diffusers pipeline directories; every stage then
loads them through the same `from_pretrained` path a real checkpoint takes.
Only the build imports torch/diffusers, so the gateway can call
`ensure_builtin` cheaply once the cache is warm.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# builtin name -> its builder module in worker/models/tiny/ (a `build()` that
# returns the pipeline, and SERVING: default steps, guidance and max size).
_BUILDERS = {
    "tiny-unet": "unet",
    "tiny-mmdit": "mmdit",
    "tiny-flux": "flux",
    "tiny-sdxl": "sdxl",
    "tiny-qwen-image": "qwen_image",
    "tiny-wan": "wan",
    "tiny-wan-i2v": "wan_i2v",
}
BUILTIN_NAMES = tuple(_BUILDERS)
# Written last into every builtin dir; bump BUILD_VERSION when a builder
# changes so stale caches are rebuilt instead of silently reused.
SIDECAR = "disagfusion.json"
BUILD_VERSION = 2
# Building seeds torch's global RNG, so threads of one process build one at a time.
_BUILD_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """Root of the builtin cache: $DISAGFUSION_CACHE or ~/.cache/disagfusion/models."""
    env = os.environ.get("DISAGFUSION_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "disagfusion" / "models"


def builtin_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / name


def read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / SIDECAR).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_current(path: Path, name: str) -> bool:
    meta = read_sidecar(path)
    return (
        meta is not None
        and meta.get("name") == name
        and meta.get("version") == BUILD_VERSION
        and (path / "model_index.json").is_file()
    )


def ensure_builtin(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cached dir of builtin `name`, building it first if needed.

    Built in a temp dir beside the target and renamed into place: rename is
    atomic, so processes starting together never see a half-written model;
    the losers of the race drop their copy and use the winner's.
    """
    if name not in BUILTIN_NAMES:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    final = builtin_path(name, cache_dir)
    if _is_current(final, name):
        return final
    with _BUILD_LOCK:
        if not _is_current(final, name):
            _build_and_swap(name, final)
    return final


def _build_and_swap(name: str, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=final.parent))
    try:
        build_builtin(name, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        if final.exists() and not _is_current(final, name):
            # Stale build from an older BUILD_VERSION: move it aside, then swap.
            # Renaming onto a fresh empty dir works and cannot collide.
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=final.parent))
            with contextlib.suppress(OSError):  # another process moved it first
                final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            if not _is_current(final, name):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_builtin(name: str, out_dir: str | os.PathLike[str]) -> None:
    """Build builtin `name` deterministically and save it into `out_dir`."""
    import torch

    if name not in _BUILDERS:
        raise ValueError(f"unknown builtin model {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    module = importlib.import_module(f"disagfusion.worker.models.tiny.{_BUILDERS[name]}")
    out = Path(out_dir)
    with torch.random.fork_rng(devices=[]):  # keep the caller's RNG state untouched
        pipe = module.build()
    with quiet_progress():
        pipe.save_pretrained(out, safe_serialization=True)
    meta = {"builder": "disagfusion", "name": name, "version": BUILD_VERSION, **module.SERVING}
    (out / SIDECAR).write_text(json.dumps(meta, indent=2) + "\n")


@contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide diffusers/transformers tqdm bars (saving, loading) for the duration."""
    from diffusers.utils import logging as df_logging
    from transformers.utils import logging as hf_logging

    enabled = [(m, m.is_progress_bar_enabled()) for m in (df_logging, hf_logging)]
    for module, _ in enabled:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was_enabled in enabled:
            if was_enabled:
                module.enable_progress_bar()
