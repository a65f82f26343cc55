"""The GAN's losses of deprivatization, in their standard form (spec section 2).

Kept free of models and data so that each can be checked against numbers
computed by hand (``tests/test_losses.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Standard GAN discriminator loss: real -> 1, fake -> 0 (mean of the two BCEs)."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: -mean log D(G(z))."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def information_maximisation(fake_logits: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """L_IM = -(1/m) sum_i y_i log D(G(z_i)), with y_i the teacher's detached top probability.

    ``fake_logits`` (m, 1) are D's logits on the queried samples; log D = -softplus(-logit).
    Per sample, as the spec requires (the reference multiplied by the class index).
    """
    confidence = confidence.detach().reshape(-1).to(fake_logits.dtype)
    log_d = -F.softplus(-fake_logits.reshape(-1))
    return -(confidence * log_d).mean()
