"""A classifier or generator rebuilt from its checkpoint (:mod:`b2kd.core.checkpoint` saves them).

A checkpoint holds the model's build arguments, never its class: the architecture is looked up
by name here (:func:`b2kd.models.build_model`), so loading never unpickles code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from b2kd.core.checkpoint import read
from b2kd.models.gan import Generator
from b2kd.models.registry import build_model


def load_classifier(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a classifier in eval mode; returns (model, meta)."""
    ckpt = read(path, "classifier")
    model = build_model(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt["meta"]


def load_generator(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a generator, frozen and in eval mode; returns (generator, meta)."""
    ckpt = read(path, "generator")
    gen = Generator(**ckpt["config"])
    gen.load_state_dict(ckpt["state_dict"])
    gen.eval().requires_grad_(False)
    return gen, ckpt["meta"]
