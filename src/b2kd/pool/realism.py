"""How real a free generator candidate looks, by deprivatization's own discriminator.

D was trained to tell the private images from G's: its logit on a candidate is a
label-free, query-free measure of how much the candidate looks like the edge's
images. The balanced pool (``distill.balance_realism``) drops, class by class, the
share of candidates D rates least real before it chooses what to pay for. Nothing
here sends anything; D reads generator images only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from b2kd.core.checkpoint import CheckpointError, read
from b2kd.models import Discriminator, from_uint8


def discriminator_path(generator_path: str | Path) -> Path:
    """Where deprivatization left D beside ``generator.pt``: ``discriminator.pt``, or, for runs
    made before it was saved there, the last GAN state in ``checkpoints/gan_latest.pt``."""
    gan_dir = Path(generator_path).parent
    for path in (gan_dir / "discriminator.pt", gan_dir / "checkpoints" / "gan_latest.pt"):
        if path.is_file():
            return path
    raise CheckpointError(
        f"distill.balance_realism needs deprivatization's discriminator beside {generator_path}"
        " (discriminator.pt or checkpoints/gan_latest.pt); none found")


def load_discriminator(generator_path: str | Path) -> torch.nn.Module:
    """D of the GAN whose generator is ``generator_path``, frozen, in eval mode."""
    path = discriminator_path(generator_path)
    ckpt = read(path)
    if ckpt["kind"] == "discriminator":
        disc = Discriminator(**ckpt["config"])
        state = ckpt["state_dict"]
    elif ckpt["kind"] == "gan_state":
        gen_cfg = read(generator_path, "generator")["config"]
        state = ckpt["discriminator"]
        spectral = any("parametrizations" in key for key in state)
        # with dropout, the second convolution is layer 3 (conv, LeakyReLU, Dropout2d); without, 2
        dropout = 0.25 if any(key.startswith("features.3.") for key in state) else 0.0
        disc = Discriminator(gen_cfg["image_size"], gen_cfg["channels"], spectral_norm=spectral,
                             dropout=dropout)
    else:
        raise CheckpointError(f"{path} holds a {ckpt['kind']}, expected a discriminator")
    disc.load_state_dict(state)
    return disc.eval().requires_grad_(False)


@torch.no_grad()
def realism(disc: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """D's logit on uint8 images (higher: more like the private images), on D's device."""
    device = next(disc.parameters()).device
    return torch.cat([disc(from_uint8(images[i : i + batch].to(device))).flatten().cpu()
                      for i in range(0, len(images), batch)])


def drop_least_real(pred: torch.Tensor, scores: torch.Tensor, share: float) -> torch.Tensor:
    """A mask keeping, within each predicted class, all but the ``share`` of candidates with the
    lowest ``scores`` (rounded down, so a class of one candidate keeps it)."""
    keep = torch.ones(len(pred), dtype=torch.bool)
    for k in pred.unique().tolist():
        members = (pred == k).nonzero().flatten()
        n_drop = int(len(members) * share)
        keep[members[scores[members].argsort()[:n_drop]]] = False
    return keep
