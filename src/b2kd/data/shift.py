"""A distribution gap between the teacher's data and the edge's private set.

The private set need not look like what the teacher was trained on. These
shifts are applied when the private set is drawn (the test set stays the
teacher's task):

- ``imbalance``: the listed classes are kept at ``factor`` of their frequency
  (labels are used only to draw the set, then dropped like always);
- ``corrupt``: each image gets one corruption, drawn per image from
  ``blur``, ``noise``, ``rotation`` and ``contrast``.

A private set from another reader entirely is ``data.private_dataset``.
Everything is seeded and batched; images stay uint8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CORRUPTIONS = ("blur", "noise", "rotation", "contrast")


def imbalance(labels: torch.Tensor, classes: list[int], factor: float, seed: int) -> torch.Tensor:
    """Indices that keep every image of the other classes and ``factor`` of each listed class's."""
    rng = torch.Generator().manual_seed(seed)
    keep = torch.ones(len(labels), dtype=torch.bool)
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        drop = idx[torch.randperm(len(idx), generator=rng)][round(len(idx) * factor):]
        keep[drop] = False
    return keep.nonzero().flatten()


def blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian blur (5x5 kernel), channel by channel, on float images."""
    r = torch.arange(-2, 3, dtype=torch.float32)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :]).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel, groups=x.shape[1])


def noise(x: torch.Tensor, std: float, rng: torch.Generator) -> torch.Tensor:
    return x + std * 255 * torch.randn(x.shape, generator=rng)


def rotate(x: torch.Tensor, max_degrees: float, rng: torch.Generator) -> torch.Tensor:
    """Rotate each image by a random angle in [-max_degrees, max_degrees] (zeros fill the corners)."""
    angle = (torch.rand(len(x), generator=rng) * 2 - 1) * math.radians(max_degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Pull every pixel towards the image's mean by ``factor`` (below 1 lowers the contrast)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + factor * (x - mean)


def corrupt(images: torch.Tensor, seed: int, kinds: tuple[str, ...] = CORRUPTIONS) -> torch.Tensor:
    """One corruption per image, drawn uniformly from ``kinds``; uint8 in, uint8 out."""
    unknown = set(kinds) - set(CORRUPTIONS)
    if unknown or not kinds:
        raise ValueError(f"unknown corruption(s) {sorted(unknown)}; choose from {', '.join(CORRUPTIONS)}")
    rng = torch.Generator().manual_seed(seed)
    which = torch.randint(len(kinds), (len(images),), generator=rng)
    x = images.float()
    out = x.clone()
    for i, kind in enumerate(kinds):
        sel = (which == i).nonzero().flatten()
        if not len(sel):
            continue
        part = x[sel]
        if kind == "blur":
            part = blur(part)
        elif kind == "noise":
            part = noise(part, 0.2, rng)
        elif kind == "rotation":
            part = rotate(part, 30.0, rng)
        else:
            part = contrast(part, 0.4)
        out[sel] = part
    return out.round().clamp(0, 255).to(torch.uint8)
