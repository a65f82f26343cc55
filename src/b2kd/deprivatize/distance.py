"""How far the generator's images are from the private images, without a label or a query.

The Fréchet distance (the FID's formula, Heusel et al., 2017) between the private images and the
generator's, both projected on the private images' leading principal components. No pretrained
network is needed (none can be downloaded here) and nothing leaves the device: the components,
the private sample and the fixed latent draws are made once, on the device, at the start of
deprivatization. Lower is closer; it is what a label-free stopping rule can watch.
"""

from __future__ import annotations

import torch

from b2kd.models import quantize_uint8


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two (n, d) samples."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.atleast_2d(torch.cov(a.T)), torch.atleast_2d(torch.cov(b.T))
    values, vectors = torch.linalg.eigh(s_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * cross)


class PrivateDistance:
    """Fréchet distance of a generator's images to a fixed sample of private images (uint8), in the
    sample's ``components`` leading principal components of pixel space."""

    def __init__(self, private: torch.Tensor, latent_dim: int, samples: int = 1000, components: int = 32,
                 seed: int = 0):
        rng = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(private), generator=rng)[:samples]
        real = private[pick].flatten(1).double() / 255
        self.mean = real.mean(0)
        _, _, vt = torch.linalg.svd(real - self.mean, full_matrices=False)
        self.basis = vt[: min(components, len(vt))].T
        self.real = (real - self.mean) @ self.basis
        self.z = torch.randn(len(pick), latent_dim, generator=rng)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        return (images.flatten(1).double() / 255 - self.mean) @ self.basis

    @torch.no_grad()
    def __call__(self, generator: torch.nn.Module, batch: int = 500) -> float:
        """The distance of ``generator`` (run in eval mode, as distillation runs it; its mode is restored)."""
        was_training = generator.training
        generator.eval()
        device = next(generator.parameters()).device
        fakes = [quantize_uint8(generator(self.z[i : i + batch].to(device))).cpu()
                 for i in range(0, len(self.z), batch)]
        generator.train(was_training)
        return frechet_distance(self.real, self.project(torch.cat(fakes)))
