"""The edge's private data: a small, seeded slice of the training set.

In black-box distillation the edge holds only a few unlabelled images; the cloud model's
labels are never seen. The split is a pure function of its arguments so that every method
compared in an experiment sees exactly the same private images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from b2kd.data.readers import ImageSet


@dataclass
class EdgeSplit:
    """Indices into the training set: the edge's local images and an optional validation part."""

    local_idx: torch.Tensor
    val_idx: torch.Tensor


def edge_split(
    n: int, local_fraction: float = 0.1, seed: int = 0, val_fraction_of_local: float = 0.0
) -> EdgeSplit:
    """Pick ``round(n * local_fraction)`` indices, then move ``val_fraction_of_local`` of them
    to ``val_idx``; ``local_idx`` keeps the rest. Both are sorted and disjoint.
    """
    if not 0 < local_fraction <= 1:
        raise ValueError(f"local_fraction must be in (0, 1], got {local_fraction}")
    if not 0 <= val_fraction_of_local < 1:
        raise ValueError(f"val_fraction_of_local must be in [0, 1), got {val_fraction_of_local}")
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    chosen = chosen[: max(1, round(n * local_fraction))]
    n_val = round(len(chosen) * val_fraction_of_local)
    return EdgeSplit(local_idx=chosen[n_val:].sort().values, val_idx=chosen[:n_val].sort().values)


def private_images(train: ImageSet, split: EdgeSplit) -> torch.Tensor:
    """The edge's local images as uint8 (N, C, H, W), deliberately without their labels,
    so that no training step can use them by mistake."""
    return train.images[split.local_idx]


def dev_split(n: int, local_idx: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """``size`` labelled training indices outside the private split, for tuning only.

    Every tuned value (learning rates, temperatures, thresholds) is chosen on this
    split, never on the test set; the student never trains on it.
    """
    if size < 0:
        raise ValueError(f"dev size must be >= 0, got {size}")
    outside = torch.ones(n, dtype=torch.bool)
    outside[local_idx] = False
    candidates = outside.nonzero().flatten()
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed + 104_729))
    return candidates[order[: min(size, len(candidates))]].sort().values
