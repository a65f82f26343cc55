"""Class-balanced real batches for deprivatization, with no private image ever labelled by the teacher.

A private set where some classes are rare makes a GAN that draws them rarer still, and MEKD's
student then sees few and poor images of them. During deprivatization the teacher answers only on
generator images. A small classifier (the labeller) is fitted on the device to those paid answers and
labels the private images; the discriminator's real batches are then drawn with weights
``n_c ** -strength`` (``n_c``: the private images it put in class c), each image at most
``max_boost`` times as often as plain shuffling would draw it. At strength 1 every class is seen about
as often, at 0 the set is drawn as it is. Nothing here queries anything: the labels are read off
answers already paid for, and the private images never leave the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2kd.data.augment import random_crop
from b2kd.models import build_model


def make_labeller(num_classes: int, channels: int, size: int, seed: int) -> torch.nn.Module:
    """A LeNet-5, initialised from ``seed`` without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model("lenet5", num_classes, channels, size)


def fit_labeller(net: torch.nn.Module, images: torch.Tensor, answers: torch.Tensor, steps: int,
                 generator: torch.Generator, batch_size: int = 128, lr: float = 0.05) -> torch.nn.Module:
    """``steps`` SGD steps of cross-entropy on the paid answers (probabilities; uint8 images, shifted
    by up to 2 pixels); the net is trained in place, on the CPU, and returned in eval mode."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator)
        x = random_crop(images[idx].float() / 255.0, 2, generator)
        loss = -(answers[idx] * F.log_softmax(net(x), dim=1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def label_private(net: torch.nn.Module, private: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The labeller's top-1 class of each private image (uint8 in)."""
    return torch.cat([net(private[i : i + chunk].float() / 255.0).argmax(1)
                      for i in range(0, len(private), chunk)])


def balancing_weights(pseudo: torch.Tensor, strength: float, max_boost: float) -> torch.Tensor:
    """Per-image sampling weights ``n_c ** -strength`` for the labels ``pseudo``, none above
    ``max_boost`` times the uniform weight 1/N (the cap is applied, then the weights renormalised
    once, so a capped image ends near, not exactly at, the cap); they sum to 1."""
    counts = torch.bincount(pseudo).float()
    weights = counts[pseudo].pow(-strength)
    weights = weights / weights.sum()
    weights = weights.clamp(max=max_boost / len(pseudo))
    return weights / weights.sum()
