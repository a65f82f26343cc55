"""The classifier base class: every model owns its input normalisation.

Images travel through b2kd as uint8 (at rest, on the wire to the teacher, in the
query cache), so a model must accept uint8 batches directly and must not depend
on callers remembering which mean/std a checkpoint was trained with. Keeping
``mean``/``std`` as buffers puts them in the ``state_dict`` (and in exported
ONNX graphs) next to the weights they belong to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

Stats = float | Sequence[float]


def _channel_stats(value: Stats, channels: int, name: str) -> torch.Tensor:
    """Broadcastable (1, C, 1, 1) tensor from a scalar or one value per channel."""
    values = [float(value)] * channels if isinstance(value, int | float) else list(value)
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values but the model has {channels} channels")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


class Classifier(nn.Module):
    """Image classifier taking uint8 images or floats in [0, 1].

    The default mean = std = 0.5 maps [0, 1] to [-1, 1], which is the reference
    code's preprocessing and also the range of the GAN generator's output.
    Subclasses implement :meth:`features_logits` on the normalised tensor.
    """

    mean: torch.Tensor
    std: torch.Tensor
    # Set by ``build_model``: the registry name and the arguments that rebuild it.
    arch: str
    config: dict[str, Any]

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: Stats = 0.5,
        std: Stats = 0.5,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.register_buffer("mean", _channel_stats(mean, in_channels, "mean"))
        self.register_buffer("std", _channel_stats(std, in_channels, "std"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes) for images of shape (N, C, H, W).

        uint8 input is scaled by 1/255 on its own device (no host round trip);
        elementwise ops keep a channels_last layout intact.
        """
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype) / 255
        return self.features_logits((x - self.mean) / self.std)

    def features_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from a normalised batch; implemented by each architecture."""
        raise NotImplementedError
