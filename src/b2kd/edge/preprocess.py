"""How uint8 pixels become what a served model takes: UINT8 as they are, or normalised floats.

b2kd keeps images as uint8 (at rest, in the ledger, as what it pays for); most
providers' models take FP32 (sometimes FP16) inputs that are already
normalised. The user states the normalisation, as a named preset or as
``teacher.input_scale`` / ``input_mean`` / ``input_std`` (each overriding the
preset's value); each input value is ``(pixel * scale - mean) / std``, per
channel. Nothing is guessed: a float model with no stated preprocessing is an
error, since a wrong guess trains a student on answers to other images.

Floats cost more on the wire: 4 bytes per pixel for FP32, 2 for FP16 (UINT8: 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from b2kd.blackbox.base import BlackBoxError

#: Input datatypes a served model may take, and the numpy type each travels as.
INPUT_DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "FP16": np.float16}

#: Named preprocessings: (scale, mean per channel or one for all, std likewise).
PRESETS: dict[str, tuple[float, tuple[float, ...], tuple[float, ...]]] = {
    "raw": (1.0, (0.0,), (1.0,)),  # pixel values 0..255 as floats
    "unit": (1 / 255, (0.0,), (1.0,)),  # [0, 1]
    "symmetric": (1 / 255, (0.5,), (0.5,)),  # [-1, 1]
    "mnist": (1 / 255, (0.1307,), (0.3081,)),
    "cifar10": (1 / 255, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": (1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class PreprocessError(BlackBoxError):
    """A stated preprocessing that does not fit the served model's input."""


@dataclass(frozen=True)
class Preprocess:
    """uint8 (N, C, H, W) -> the served model's input array, as ``datatype``."""

    datatype: str = "UINT8"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @classmethod
    def build(cls, datatype: str, channels: int, preset: str | None = None, scale: float | None = None,
              mean: list[float] | None = None, std: list[float] | None = None) -> Preprocess:
        """The preprocessing for a model taking ``datatype`` inputs of ``channels`` channels, checked."""
        stated = preset is not None or scale is not None or mean is not None or std is not None
        if datatype not in INPUT_DTYPES:
            raise PreprocessError(f"its input is {datatype!r:.40}; b2kd sends UINT8, FP32 or FP16 images")
        if datatype == "UINT8":
            if stated:
                raise PreprocessError("its input is UINT8 (raw pixels): teacher.input_preset, input_scale,"
                                      " input_mean and input_std apply only to FP32/FP16 inputs; drop them")
            return cls()
        if not stated:
            raise PreprocessError(
                f"its input is {datatype}: say how pixels become its inputs, as teacher.input_preset"
                f" ({', '.join(PRESETS)}) or teacher.input_scale, input_mean and input_std"
                " (input = (pixel * scale - mean) / std)")
        if preset is not None and preset not in PRESETS:
            raise PreprocessError(f"unknown teacher.input_preset '{preset}'; use one of {', '.join(PRESETS)}")
        base_scale, base_mean, base_std = PRESETS[preset] if preset else (1.0, (0.0,), (1.0,))
        scale = base_scale if scale is None else float(scale)
        mean_t = _per_channel(base_mean if mean is None else mean, channels, "input_mean")
        std_t = _per_channel(base_std if std is None else std, channels, "input_std")
        if not math.isfinite(scale) or scale <= 0:
            raise PreprocessError(f"teacher.input_scale must be a finite number > 0, got {scale}")
        if any(s <= 0 for s in std_t):
            raise PreprocessError(f"teacher.input_std must be > 0, got {list(std_t)}")
        return cls(datatype, scale, mean_t, std_t)

    @property
    def bytes_per_value(self) -> int:
        return np.dtype(INPUT_DTYPES[self.datatype]).itemsize

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        if self.datatype == "UINT8":
            return images.numpy()
        c = images.shape[1]
        mean = torch.tensor(self.mean if len(self.mean) == c else self.mean * c).view(1, c, 1, 1)
        std = torch.tensor(self.std if len(self.std) == c else self.std * c).view(1, c, 1, 1)
        # pixel * scale in float64 rounds once to float32, as pixel / 255 does in a float32 model
        x = (images.to(torch.float64) * self.scale).to(torch.float32)
        x = (x - mean) / std
        return x.numpy().astype(INPUT_DTYPES[self.datatype])


def _per_channel(values, channels: int, key: str) -> tuple[float, ...]:
    values = [values] if isinstance(values, int | float) else list(values)
    if len(values) not in (1, channels):
        raise PreprocessError(f"teacher.{key} has {len(values)} values; give 1 or one per channel"
                              f" ({channels})")
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise PreprocessError(f"teacher.{key} must hold finite numbers, got {values}")
    return tuple(float(v) for v in values)
