"""Batched image augmentation written with plain torch (b2kd avoids torchvision).

Every function draws one random number per image, on the CPU from an optional
``torch.Generator``, so a seeded run gives the same batch on any device, and applies the
draws to the whole batch at once instead of looping over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 bytes -> floats in [0, 1], the same image as a classifier reads it (floats as floats)."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad (N, C, H, W) by ``padding`` and crop back to H x W at a random offset per image."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator).to(x.device)
    rows = (dy + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * padding)
    cols = (dx + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


@dataclass(frozen=True)
class Augment:
    """The augmentation for one experiment, e.g. ``Augment(crop_padding=4, hflip=True)``.

    Defaults do nothing; flips are off by default because they change digit identity.
    """

    crop_padding: int = 0
    hflip: bool = False

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_crop(x, self.crop_padding, generator)
        return random_hflip(x, generator) if self.hflip else x


def random_affine(
    x: torch.Tensor, degrees: float, translate: float, scale: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rotate by up to ``degrees``, shift by up to ``translate`` (a fraction of the side) and
    scale by a factor in [1 - scale, 1 + scale], one draw per image; floats in, floats out."""
    n = x.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1  # uniform in [-1, 1]
    angle = u[:, 0] * degrees * torch.pi / 180
    factor = 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * 2 * translate], 1),
                         torch.stack([sin, cos, u[:, 3] * 2 * translate], 1)], 1).to(x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero one ``size`` x ``size`` square per image at a random centre (it may overhang the edge)."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), generator=generator).to(x.device)
    cx = torch.randint(0, w, (n, 1, 1), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows - cy).abs() <= size // 2) & ((cols - cx).abs() <= size // 2)
    return x.masked_fill(inside.unsqueeze(1), 0.0)


@dataclass(frozen=True)
class StrongAugment:
    """The strong view of semi-supervised distillation (FixMatch-style, for digits and small
    images): affine jitter, random contrast, then cutout. uint8 in, floats in [0, 1] out."""

    degrees: float = 20.0
    translate: float = 0.12
    scale: float = 0.15
    contrast: float = 0.4  # contrast factor drawn in [1 - contrast, 1]
    cutout: int = 8

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = random_affine(unit(x), self.degrees, self.translate, self.scale, generator)
        if self.contrast > 0:
            factor = 1 - torch.rand(x.shape[0], 1, 1, 1, generator=generator).to(x.device) * self.contrast
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * factor + mean
        return cutout(x, self.cutout, generator).clamp(0.0, 1.0)
