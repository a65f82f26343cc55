"""CORAL: align the student's features on paid (synthetic) images with those on the private images.

The student trains on labelled generator images and unlabelled private images: unsupervised
domain adaptation from the synthetic to the real domain. CORAL (Sun & Saenko, ECCV 2016
workshops) matches the second-order statistics of the two domains' penultimate features,
``||C_s - C_t||_F^2 / (4 d^2)``. It reads the private images on the device only.
"""

from __future__ import annotations

import torch

from b2kd.models.penultimate import Penultimate


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The CORAL distance between two (n, d) feature batches (each needs n >= 2)."""
    d = source.shape[1]

    def cov(x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(0, keepdim=True)
        return x.T @ x / (len(x) - 1)

    return (cov(source) - cov(target)).square().sum() / (4 * d * d)


class CoralAlign:
    """Each step: the features of the method's own forward pass on the paid batch (the last pass
    the hook saw) against those of a fresh batch of weakly augmented private images."""

    def __init__(self, student: torch.nn.Module, private: torch.Tensor, batch_size: int, weight: float,
                 augment, device: torch.device):
        self.hook = Penultimate(student)
        self.private = private
        self.batch_size = min(batch_size, len(private))
        self.weight = weight
        self.augment = augment
        self.device = device

    def loss(self, student: torch.nn.Module, rng: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        source = self.hook.last
        idx = torch.randint(len(self.private), (self.batch_size,), generator=rng)
        student(self.augment(self.private[idx], generator=rng).to(self.device))
        value = coral(source.flatten(1), self.hook.last.flatten(1))
        return self.weight * value, {"coral": float(value.detach())}
