"""Datasets, the edge's private split, and augmentation."""

from b2kd.data.augment import Augment
from b2kd.data.readers import DataError, ImageSet, available, load_dataset, register
from b2kd.data.splits import EdgeSplit, dev_split, edge_split, private_images

__all__ = [
    "Augment",
    "DataError",
    "EdgeSplit",
    "ImageSet",
    "available",
    "dev_split",
    "edge_split",
    "load_dataset",
    "private_images",
    "register",
]
