"""Running an exported student with onnxruntime: what the device does, and ``b2kd predict``.

The exported graph carries the model's normalisation and declares what it
eats (uint8, or floats in [0, 1]) through its input type, so everything here
reads that from the file instead of trusting the caller. ``b2kd export``
measures accuracy and latency through this same class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import (
    Fail,
    InvalidArgument,
    InvalidGraph,
    InvalidProtobuf,
    NoSuchFile,
)
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class ModelError(Exception):
    """An exported model or an input image that cannot be used."""


def session_options(threads: int) -> ort.SessionOptions:
    """A fixed thread count, so latencies are comparable from run to run and machine to machine."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # onnxruntime's warnings are not the user's business
    return opts


class OnnxModel:
    """An ONNX classifier taking (N, C, H, W) images: uint8 in, logits out."""

    def __init__(self, path: str | Path, threads: int = 1):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model not found: {self.path}")
        try:
            self.session = ort.InferenceSession(
                str(self.path), session_options(threads), providers=["CPUExecutionProvider"]
            )
        except (Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load {self.path} as an ONNX model: {first}") from None
        inp = self.session.get_inputs()[0]
        if len(inp.shape) != 4 or not all(isinstance(d, int) for d in inp.shape[1:]):
            raise ModelError(
                f"{self.path} does not take (N, C, H, W) images: input shape {inp.shape}"
            )
        self.input_name = inp.name
        self.uint8_input = inp.type == "tensor(uint8)"
        self.channels, self.height, self.width = inp.shape[1:]

    def logits(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Logits (N, K) of uint8 images (N, C, H, W), converted to the graph's input type."""
        out = []
        for start in range(0, len(images), batch_size):
            batch = self.feed(np.ascontiguousarray(images[start : start + batch_size]))
            out.append(self.session.run(None, {self.input_name: batch})[0])
        return np.concatenate(out)

    def run_batch(self, feed: np.ndarray) -> None:
        """One forward pass on an already converted batch (for latency measurements)."""
        self.session.run(None, {self.input_name: feed})

    def feed(self, images: np.ndarray) -> np.ndarray:
        """uint8 images in the graph's input type."""
        return images if self.uint8_input else images.astype(np.float32) / 255


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def image_files(path: str | Path) -> list[Path]:
    """An image file, or the image files directly inside a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ModelError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        return files
    raise ModelError(f"no such image file or folder: {path}")


def read_image(path: Path, channels: int, height: int, width: int) -> np.ndarray:
    """One image as uint8 (C, H, W): converted to grey or RGB and resized to what the model takes."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise ModelError(f"cannot read image {path}: {exc}") from None
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


@dataclass
class Prediction:
    file: Path
    label: int
    probability: float


def predict_files(model_path: str | Path, path: str | Path, threads: int = 1) -> list[Prediction]:
    """Top-1 class and its probability for an image file or every image in a folder."""
    model = OnnxModel(model_path, threads)
    files = image_files(path)
    images = np.stack([read_image(f, model.channels, model.height, model.width) for f in files])
    probs = softmax(model.logits(images))
    labels = probs.argmax(axis=1)
    return [Prediction(f, int(k), float(p[k])) for f, k, p in zip(files, labels, probs)]
