"""Differentiable augmentation for GANs trained on few images (DiffAugment, Zhao et al., 2020).

The same random transformation family is applied to real and generated images
before the discriminator sees them, and gradients flow through it to the
generator, so the discriminator cannot memorise a few thousand images while
the generator still learns the un-augmented distribution. Images are floats in
[-1, 1]; every op draws one number per image.
"""

from __future__ import annotations

import torch

from b2kd.data.augment import cutout, random_crop

POLICIES = ("color", "translation", "cutout")


def diff_augment(x: torch.Tensor, policies: tuple[str, ...], generator: torch.Generator | None = None,
                 translate: float = 0.125, cutout_ratio: float = 0.5) -> torch.Tensor:
    """Apply ``policies`` in order: "color" (brightness, contrast), "translation" (integer shift up
    to ``translate`` of the side, zero fill), "cutout" (a square of ``cutout_ratio`` of the side)."""
    for policy in policies:
        if policy == "color":
            n = x.shape[0]
            brightness = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5).to(x.device)
            contrast = (torch.rand(n, 1, 1, 1, generator=generator) + 0.5).to(x.device)
            x = x + brightness
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * contrast + mean
        elif policy == "translation":
            x = random_crop(x, max(1, round(x.shape[-1] * translate)), generator)
        elif policy == "cutout":
            x = cutout(x, max(1, round(x.shape[-1] * cutout_ratio)), generator)
        else:
            raise ValueError(f"unknown DiffAugment policy '{policy}'; use {', '.join(POLICIES)}")
    return x
