"""Structural similarity (SSIM, Wang et al. 2004) of image pairs, batched, in torch.

The audit needs SSIM for tens of thousands of (sent, private) pairs; a batched
torch version with a separable Gaussian window does that in a second on a CPU,
without adding scikit-image as a dependency.
"""

from __future__ import annotations

import torch

from b2kd.data.augment import unit

WINDOW = 11  # the paper's 11x11 Gaussian window, sigma 1.5
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _band(n: int, w: torch.Tensor) -> torch.Tensor:
    """(n - k + 1, n) matrix whose row i applies the 1-D window ``w`` at offset i ('valid')."""
    k = len(w)
    band = torch.zeros(n - k + 1, n, dtype=w.dtype, device=w.device)
    for i in range(n - k + 1):
        band[i, i : i + k] = w
    return band


def _blur(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of (..., H, W) as two matrix products.

    On 28x28 images this is about 10x faster on a CPU than ``conv2d`` with 11x1
    and 1x11 kernels, which oneDNN handles poorly at one channel.
    """
    return rows @ x @ cols.T


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of each pair (a[i], b[i]) of images (N, C, H, W): one value per pair in [-1, 1].

    uint8 input is scaled to [0, 1] (dynamic range L = 1). Mean over the 'valid'
    SSIM map and the channels, as in the reference implementation; the window
    shrinks to the image for images smaller than 11 px.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"ssim needs pairs of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a, b = unit(a), unit(b)
    h, w = a.shape[-2:]
    size = min(WINDOW, h, w)
    window = _gaussian(size, SIGMA * size / WINDOW).to(a.device)
    rows, cols = _band(h, window), _band(w, window)
    c1, c2 = K1**2, K2**2
    mu_a, mu_b, aa, bb, ab = _blur(torch.stack([a, b, a * a, b * b, a * b]), rows, cols)
    var_a = aa - mu_a**2
    var_b = bb - mu_b**2
    cov = ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)
