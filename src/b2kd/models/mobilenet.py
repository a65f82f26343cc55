"""CIFAR-style MobileNet v1 (Howard et al. 2017).

The ImageNet stem (stride-2 conv) is replaced by a stride-1 conv so small
images keep enough resolution; four stride-2 depthwise blocks remain
(32 -> 2 px, 28 -> 2 px), followed by global average pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from .normalize import Classifier, Stats
from .registry import register

# (output channels, stride) of the depthwise-separable blocks.
BLOCKS: list[tuple[int, int]] = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]  # fmt: skip


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
    )


class MobileNetV1(Classifier):
    """MobileNet v1; ``width_mult`` scales every layer's channel count."""

    def __init__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width_mult: float = 1.0,
        mean: Stats = 0.5,
        std: Stats = 0.5,
    ) -> None:
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        super().__init__(num_classes, in_channels, image_size, mean, std)

        def scaled(c: int) -> int:
            return max(8, round(c * width_mult))

        channels = scaled(32)
        layers: list[nn.Module] = [_conv_bn(in_channels, channels, 3, 1)]
        for out_ch, stride in BLOCKS:
            out_ch = scaled(out_ch)
            layers.append(_conv_bn(channels, channels, 3, stride, groups=channels))  # depthwise
            layers.append(_conv_bn(channels, out_ch, 1, 1))  # pointwise
            channels = out_ch
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


register("mobilenet")(MobileNetV1)
