"""Model layer: builtin tiny models, model description, per-role stage loading.

`describe_model` and friends are torch-free (the gateway imports this package);
the stage API imports torch, so it is loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from disagfusion.scheduling.builtin_profiles import BUILTIN_PREFIX
from disagfusion.worker.models.builtin import BUILTIN_NAMES, ensure_builtin
from disagfusion.worker.models.loading import ModelInfo, ModelSourceError, describe_model

if TYPE_CHECKING:
    from disagfusion.worker.models.images import images_to_png
    from disagfusion.worker.models.stages import (
        StageInputError,
        StageModel,
        input_names,
        load_stage,
        output_names,
    )

__all__ = [
    "BUILTIN_NAMES",
    "BUILTIN_PREFIX",
    "ModelInfo",
    "ModelSourceError",
    "StageInputError",
    "StageModel",
    "describe_model",
    "ensure_builtin",
    "images_to_png",
    "input_names",
    "load_stage",
    "output_names",
]

_LAZY = {
    "images_to_png": "images",
    "StageInputError": "stages",
    "StageModel": "stages",
    "input_names": "stages",
    "load_stage": "stages",
    "output_names": "stages",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
