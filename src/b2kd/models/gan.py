"""The deprivatization GAN (method spec, section 2) and image conversion helpers.

The generator emits images in [-1, 1] (tanh). Before anything is sent to the
teacher, or shown to the student, it is quantised to uint8 with
:func:`quantize_uint8`: the teacher API only ever sees bytes, and the student
trains on exactly the bytes the teacher answered for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Generator(nn.Module):
    """z in R^latent_dim -> image (N, channels, s, s) in [-1, 1].

    Reference shape: Linear -> (w0, s/4, s/4) -> BN -> up x2 -> conv w0->w0 ->
    BN -> LReLU -> up x2 -> conv w0->w1 -> BN -> LReLU -> conv w1->C -> tanh.
    BatchNorm uses the default eps: the reference passes 0.8 positionally as eps
    (meant as momentum), which flattens the normalisation.
    """

    def __init__(
        self,
        latent_dim: int,
        image_size: int = 32,
        channels: int = 1,
        widths: Sequence[int] = (128, 64),
    ) -> None:
        super().__init__()
        if image_size % 4 or image_size <= 0:
            raise ValueError(
                f"generator image_size must be a positive multiple of 4, got {image_size}"
            )
        w0, w1 = widths
        self.config = {
            "latent_dim": latent_dim,
            "image_size": image_size,
            "channels": channels,
            "widths": [w0, w1],
        }
        self.latent_dim = latent_dim
        self.init_size = image_size // 4
        self.fc = nn.Linear(latent_dim, w0 * self.init_size**2)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(w0),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(w0, w0, 3, padding=1),
            nn.BatchNorm2d(w0),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(w0, w1, 3, padding=1),
            nn.BatchNorm2d(w1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(w1, channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.blocks(x)


class Discriminator(nn.Module):
    """Image in [-1, 1] -> one raw logit per image, shape (N, 1).

    Returns logits rather than probabilities so the GAN loss can use
    ``binary_cross_entropy_with_logits``, which is stable where log(sigmoid)
    is not. With ``spectral_norm`` every convolution and the head are spectrally
    normalised (Miyato et al., ICLR 2018), which bounds D's Lipschitz constant,
    and D has no BatchNorm (SN-GAN's discriminator has none). ``dropout`` is the
    rate of the Dropout2d after each convolution (the reference's 0.25; 0: none).
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 1,
        widths: Sequence[int] = (16, 32, 64, 128),
        spectral_norm: bool = False,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.config = {"image_size": image_size, "channels": channels, "widths": list(widths),
                       "spectral_norm": spectral_norm, "dropout": dropout}
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        layers: list[nn.Module] = []
        in_ch, side = channels, image_size
        for i, width in enumerate(widths):
            layers += [sn(nn.Conv2d(in_ch, width, 3, 2, 1)), nn.LeakyReLU(0.2)]
            if dropout > 0:
                layers.append(nn.Dropout2d(dropout))
            if i > 0 and not spectral_norm:
                layers.append(nn.BatchNorm2d(width))
            in_ch, side = width, (side + 1) // 2  # stride-2, pad-1 3x3 conv: ceil(s / 2)
        self.features = nn.Sequential(*layers)
        self.head = sn(nn.Linear(in_ch * side * side, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map generator output from [-1, 1] to [0, 1], the classifiers' float range."""
    return (x + 1) / 2


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 bytes [0, 255] -> float [-1, 1], the generator's output range (what D reads)."""
    return images.float() / 127.5 - 1.0


def quantize_uint8(x: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 bytes, ``round((x + 1) / 2 * 255)``.

    Values outside [-1, 1] are clamped. ``torch.round`` rounds half to even, so
    exact midpoints go to the even byte: 0.0 -> 127.5 -> 128.
    """
    return ((x.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
