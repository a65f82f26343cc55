"""Batched image augmentation written with plain torch (b2kd avoids torchvision).

Every function draws one random number per image, on the CPU from an optional
``torch.Generator``, so a seeded run gives the same batch on any device, and applies the
draws to the whole batch at once instead of looping over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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
