"""Model families: one module per diffusers pipeline class, behind one seam.

Adding a family means adding a module here (a `Family` subclass as `FAMILY`),
its name in `_MODULES`, and its builtin in `tiny/`. Importing this package is
torch-free: the gateway describes models with it.
"""

from __future__ import annotations

import importlib

from disagfusion.worker.models.families.base import Family, SizeRules, TensorSpec

__all__ = ["ALIASES", "FAMILIES", "Family", "SizeRules", "TensorSpec", "by_class", "by_name"]

_MODULES = ("unet", "sd3", "flux", "sdxl", "qwen_image", "wan", "wan_i2v")
FAMILIES: dict[str, Family] = {
    f.name: f for f in (importlib.import_module(f"{__name__}.{m}").FAMILY for m in _MODULES)
}
# Old names still accepted (a DiffusionPipeline may say family: mmdit).
ALIASES = {"mmdit": "sd3"}


def by_class(pipeline_class: str) -> Family | None:
    """The family serving a model_index.json `_class_name`, or None."""
    return next((f for f in FAMILIES.values() if f.pipeline_class == pipeline_class), None)


def by_name(name: str) -> Family:
    """A family by name (or old alias); KeyError names the known ones."""
    family = FAMILIES.get(ALIASES.get(name, name))
    if family is None:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return family
