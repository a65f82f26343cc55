"""CIFAR-style VGG (Simonyan & Zisserman 2015) with a single linear classifier.

The 32 px recipe halves the map five times down to 1x1. At 28 px the fifth
halving would reach 0x0, so a max-pool is skipped once the map is 1x1; an adaptive average pool then makes the classifier
independent of the input size (28, 32, 64, ...).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .normalize import Classifier, Stats
from .registry import register

# Conv widths per stage; every stage ends with a 2x2 max-pool.
STAGES: dict[int, list[list[int]]] = {
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class VGG(Classifier):
    """VGG-11/13/19, optionally with BatchNorm after every convolution."""

    def __init__(
        self,
        depth: int,
        batch_norm: bool,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        mean: Stats = 0.5,
        std: Stats = 0.5,
    ) -> None:
        if depth not in STAGES:
            raise ValueError(f"VGG depth must be one of {sorted(STAGES)}, got {depth}")
        super().__init__(num_classes, in_channels, image_size, mean, std)
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for widths in STAGES[depth]:
            for width in widths:
                layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU())
                channels = width
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def features_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


for _depth in STAGES:
    register(f"vgg{_depth}")(partial(VGG, _depth, False))
    register(f"vgg{_depth}_bn")(partial(VGG, _depth, True))
