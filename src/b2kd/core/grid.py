"""Image grids as PNG files, written with Pillow (no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Tile uint8 images (N, C, H, W) into one PNG; grey for C == 1, RGB for C == 3."""
    if images.dtype != torch.uint8:
        raise TypeError("save_grid expects uint8 images")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, q = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y : y + h, x : x + w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas[..., 0] if c == 1 else canvas).save(path)
    return path
