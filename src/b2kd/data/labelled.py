"""The device owner's few labelled images of a new task (``b2kd adapt``), and the K-shot choice.

Two formats: a folder with one sub-folder per class (the folder's name is the class name)
of images, or an ``.npz`` with ``images`` (uint8, N,H,W or N,C,H,W), ``labels`` (integers)
and optionally ``classes`` (names, indexed by the labels; without it a label's name is its
number). ``classes`` given by the caller fixes the task's label set and its order: every
class found must be one of them. Nothing is resized or recoloured: images must already be
what the student takes (:func:`check_shape` says what they are otherwise).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from b2kd.data.readers import IMAGE_SUFFIXES, DataError


@dataclass
class LabelledSet:
    """uint8 images (N, C, H, W) and int64 labels (N,) indexing ``classes``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


def _label_set(found: Sequence[str], classes: Sequence[str] | None, path: Path) -> list[str]:
    if classes is None:
        return list(found)
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise DataError(f"the class names {', '.join(classes)} repeat a name")
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise DataError(f"{path}: class {unknown[0]!r} is not one of the classes given"
                        f" ({', '.join(classes)})")
    return classes


def _read_image(path: Path) -> np.ndarray:
    """(C, H, W) uint8: grey images as one channel, anything else as RGB."""
    try:
        with Image.open(path) as im:
            grey = im.mode in ("1", "L", "LA", "I", "I;16")
            arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return arr[None] if grey else arr.transpose(2, 0, 1)


def _read_folder(path: Path, classes: Sequence[str] | None) -> LabelledSet:
    folders = sorted(p for p in path.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"{path} holds no class folders (one sub-folder of images per class)")
    names = _label_set([f.name for f in folders], classes, path)
    images, labels = [], []
    for folder in folders:
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        images += [_read_image(f) for f in files]
        labels += [names.index(folder.name)] * len(files)
    shapes = sorted({a.shape for a in images})
    if len(shapes) > 1:
        raise DataError(f"the images under {path} differ in shape ({shapes[0]} and {shapes[-1]},"
                        " as channels x height x width); give them one size and colour")
    return LabelledSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long),
                       names, str(path))


def _read_npz(path: Path, classes: Sequence[str] | None) -> LabelledSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as an .npz of arrays: {exc}") from None
    missing = {"images", "labels"} - set(arrays)
    if missing:
        raise DataError(f"{path} lacks the array(s) {', '.join(sorted(missing))}"
                        " (images uint8 N,H,W or N,C,H,W; labels; optionally classes)")
    x, y = arrays["images"], arrays["labels"]
    if x.dtype != np.uint8:
        raise DataError(f"{path}: images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"{path}: images have shape {x.shape}; expected N,H,W or N,C,H,W with C 1 or 3")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: labels must be {len(x)} integers, one per image; got {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: labels must be >= 0, got {int(y.min())}")
    if "classes" in arrays:
        names = [str(c) for c in arrays["classes"].reshape(-1)]
        if len(y) and y.max() >= len(names):
            raise DataError(f"{path}: label {int(y.max())} has no name in its {len(names)} classes")
        found = [names[k] for k in sorted(set(y.tolist()))] if classes is not None else names
    else:
        names = None
        found = [str(k) for k in sorted(set(y.tolist()))]
    label_set = _label_set(found, classes, path)
    name_of = (lambda k: names[k]) if names is not None else str
    labels = torch.tensor([label_set.index(name_of(k)) for k in y.tolist()], dtype=torch.long)
    return LabelledSet(torch.from_numpy(np.ascontiguousarray(x)), labels, label_set, str(path))


def read_labelled(path: str | Path, classes: Sequence[str] | None = None) -> LabelledSet:
    """A labelled set from a class-folder tree or an .npz (see the module's docstring)."""
    path = Path(path).expanduser()
    if path.is_dir():
        data = _read_folder(path, classes)
    elif path.is_file() and path.suffix == ".npz":
        data = _read_npz(path, classes)
    else:
        raise DataError(f"{path} is neither a folder of class folders nor an .npz file")
    if not len(data):
        raise DataError(f"{path} holds no labelled images")
    return data


def check_shape(data: LabelledSet, channels: int, size: int, what: str = "the student") -> None:
    """Refuse images that are not ``channels`` x ``size`` x ``size`` (nothing is resized here)."""
    have = tuple(data.images.shape[1:])
    if have != (channels, size, size):
        raise DataError(f"the images in {data.source} are {have[0]}x{have[1]}x{have[2]}"
                        f" (channels x height x width) but {what} takes {channels}x{size}x{size}")


def choose_shots(data: LabelledSet, shots: int, seed: int) -> LabelledSet:
    """``shots`` images of every class, a seeded choice; a smaller K's choice is part of a larger one's."""
    picked = []
    for k, name in enumerate(data.classes):
        idx = (data.labels == k).nonzero().flatten()
        if len(idx) < shots:
            raise DataError(f"class {name!r} has {len(idx)} image(s) in {data.source},"
                            f" fewer than the {shots} shots asked for")
        order = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed * 1_000_003 + k))
        picked.append(idx[order[:shots]])
    idx = torch.cat(picked)
    return LabelledSet(data.images[idx], data.labels[idx], data.classes, data.source)
