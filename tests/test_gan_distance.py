"""The label-free distance of a generator to the private images, and the stopping rule on it."""

from __future__ import annotations

import math

import pytest
import torch

from b2kd.deprivatize.distance import PrivateDistance, frechet_distance


def test_frechet_distance_of_gaussians_is_the_closed_form():
    # 1-d: (mu_a - mu_b)^2 + (s_a - s_b)^2 with sample moments
    a = torch.tensor([[0.0], [2.0]])  # mean 1, var 2
    b = torch.tensor([[4.0], [12.0]])  # mean 8, var 32
    assert frechet_distance(a, b) == pytest.approx(49 + (math.sqrt(2) - math.sqrt(32)) ** 2)
    # diagonal 2-d: per dimension, summed
    a = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    b = a * 3 + 1
    var = 4 / 3
    per_dim = (1 - 4) ** 2 + (math.sqrt(var) - 3 * math.sqrt(var)) ** 2
    assert frechet_distance(a, b) == pytest.approx(2 * per_dim)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


class _Constant(torch.nn.Module):
    """A 'generator' that draws the same image whatever z (and has a parameter, as G does)."""

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.image = torch.nn.Parameter(image)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.image.expand(len(z), *self.image.shape) + 0 * z[:, :1, None, None]


def test_the_distance_is_lower_for_a_generator_of_the_private_images_and_restores_the_mode():
    rng = torch.Generator().manual_seed(0)
    private = torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8, generator=rng)
    distance = PrivateDistance(private, latent_dim=4, samples=200, components=8)

    class Replay(torch.nn.Module):  # draws private images: the closest a generator can be
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, z):
            idx = torch.randint(len(private), (len(z),), generator=torch.Generator().manual_seed(len(z)))
            return private[idx].float() / 127.5 - 1 + self.w

    flat = _Constant(torch.zeros(1, 8, 8))
    flat.train()
    far, near = distance(flat), distance(Replay())
    assert near < far
    assert flat.training  # measured in eval mode, then put back
