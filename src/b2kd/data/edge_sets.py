"""The edge's own images as a run's config chooses them: the private set and the labelled dev split."""

from __future__ import annotations

import torch

from b2kd.core.config import Config, ConfigError
from b2kd.data.readers import load_dataset
from b2kd.data.splits import dev_split, edge_split, private_images


def edge_private_images(cfg: Config) -> torch.Tensor:
    """The edge's private local set (uint8, no labels), seeded by ``data.split_seed``.

    With ``data.private_dataset`` it is that dataset's whole train split instead;
    ``data.private_shift`` then draws it with a gap from the teacher's data.
    """
    from b2kd.data.shift import corrupt, imbalance

    d = cfg.data
    if d.private_dataset:
        private = load_dataset(d.private_dataset, "train", d.private_root, d.image_size, d.channels)
        images, labels = private.images, private.labels
    else:
        train = load_dataset(d.dataset, "train", d.root, d.image_size, d.channels)
        split = edge_split(len(train), d.local_fraction, d.split_seed)
        images, labels = private_images(train, split), train.labels[split.local_idx]
    if d.private_shift == "imbalance":
        images = images[imbalance(labels, d.shift_classes, d.shift_factor, d.split_seed)]
    elif d.private_shift == "corrupt":
        try:
            images = corrupt(images, d.split_seed, tuple(d.corruptions))
        except ValueError as error:
            raise ConfigError(f"data.corruptions: {error}") from None
    return images


def edge_dev_set(cfg: Config):
    """The labelled dev split (images, labels): training images outside the private set."""
    d = cfg.data
    train = load_dataset(d.dataset, "train", d.root, d.image_size, d.channels)
    split = edge_split(len(train), d.local_fraction, d.split_seed)
    idx = dev_split(len(train), split.local_idx, d.dev_size, d.split_seed)
    return train.images[idx], train.labels[idx]
