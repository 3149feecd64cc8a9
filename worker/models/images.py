"""Encode decoded images (uint8 NHWC tensors) as PNG bytes."""

from __future__ import annotations

import io

import torch
from PIL import Image


def images_to_png(images: torch.Tensor) -> list[bytes]:
    """One PNG per image of a uint8 (n, H, W, 3) tensor, as the decoder returns."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be a uint8 (n, H, W, 3) tensor, got {images.dtype} {tuple(images.shape)}"
        )
    out = []
    for array in images.cpu().numpy():
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
