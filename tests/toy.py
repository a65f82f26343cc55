"""A toy teacher, generator, random dataset and config for CLI runs against served teachers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from b2kd.core.checkpoint import save_classifier, save_generator
from b2kd.models import Generator, build_model

# The toy runs test plumbing, not the recipe: a random pool, no warm-up or gradient cap, nothing
# but the paid pool to train on (the defaults add deprivatization's answers, a class-balanced pool
# and FixMatch on the private images, tests/test_defaults.py).
PLAIN_DISTILL = {"lr": 0.1, "warmup_steps": 0, "grad_clip": None, "reuse_setup": False, "pool": "random",
                 "local_unlabelled": False}


def toy_model() -> torch.nn.Module:
    """A seeded, untrained LeNet-5 for 28x28 grey images: answers do not need a trained teacher."""
    torch.manual_seed(0)
    return build_model("lenet5", num_classes=10, in_channels=1, image_size=28).eval()


def make_toy(root: Path, model: torch.nn.Module) -> Path:
    """teacher.pt (``model``), generator.pt, data.npz (random images) and toy.yaml under ``root``."""
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x_train=rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
             y_train=np.arange(100) % 10, x_test=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
             y_test=np.arange(50) % 10)
    save_classifier(model, root / "teacher.pt", dataset="npz", image_size=28)
    torch.manual_seed(0)
    save_generator(Generator(10, 28, 1, (16, 8)), root / "generator.pt")
    config = {"threads": 1,
              "data": {"dataset": "npz", "root": str(root / "data.npz"), "local_fraction": 0.25},
              "deprivatize": {"epochs": 1, "widths": [16, 8], "max_queries": 40, "query_every": 2,
                              "query_batch": 8},
              "distill": {"student": "lenet5", "budget": 200, "epochs": 1, "batch_size": 32,
                          "query_batch": 64, **PLAIN_DISTILL}}
    (root / "toy.yaml").write_text(yaml.safe_dump(config))
    return root


def assert_trained_channels_last(state_dict: dict) -> None:
    """The convolutions of a saved state dict (those with more than one input channel, whose two
    layouts differ) hold channels-last weights (b2kd.core.runtime.fast_layout)."""
    convs = [v for v in state_dict.values() if v.dim() == 4 and v.shape[1] > 1]
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs)
    assert not any(v.is_contiguous() for v in convs)
