"""The pipeline's stages: the one definition the worker, the operator and the policies share."""

from __future__ import annotations

STAGES: tuple[str, ...] = ("encoder", "denoiser", "decoder")
# The baseline's pool: one instance runs every stage back to back.
MONOLITHIC = "monolithic"


def stages_in(pool: str) -> tuple[str, ...]:
    """The stages one instance of `pool` runs: all of them for MONOLITHIC, else itself."""
    return STAGES if pool == MONOLITHIC else (pool,)
