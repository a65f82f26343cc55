"""Small classic CNNs for digit-sized images: LeNet-5 and ``cnn_small``.

``cnn_small`` is the demo teacher: it reaches about 99 % on MNIST in two
epochs on a laptop CPU, so ``make demo`` can train its own teacher offline.
"""

from __future__ import annotations

import torch
from torch import nn

from .normalize import Classifier, Stats
from .registry import register


class LeNet5(Classifier):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling.

    The classic net expects 32x32 input; smaller images (MNIST's 28x28) get a
    2-pixel zero padding on the first convolution, which is the usual way to
    feed MNIST to it. The flattened size follows from the image size.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        mean: Stats = 0.5,
        std: Stats = 0.5,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, mean, std)
        padding = 2 if image_size < 32 else 0
        side = ((image_size + 2 * padding - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet-5 needs images of at least 16 px, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )  # fmt: skip

    def features_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]


class SmallCNN(Classifier):
    """conv32-conv32-pool-conv64-conv64-pool-fc128, BN after each conv.

    No BN in the head, so training still works when a last batch holds one image.
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        dropout: float = 0.25,
        mean: Stats = 0.5,
        std: Stats = 0.5,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, mean, std)
        side = image_size // 4
        if side < 1:
            raise ValueError(f"cnn_small needs images of at least 4 px, got {image_size}")
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32), *_conv_bn_relu(32, 32), nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64), *_conv_bn_relu(64, 64), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )  # fmt: skip

    def features_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


register("lenet5")(LeNet5)
register("cnn_small")(SmallCNN)
