"""Classifier and generator checkpoints with the metadata every later stage reads.

A checkpoint is a plain dict saved with ``torch.save``: ``kind``, ``config``
(the model's build arguments), ``state_dict`` and ``meta`` (dataset, image
size, normalisation, test accuracy, ...). Only plain types are stored, so
loading uses ``weights_only=True`` and never unpickles code. Rebuilding a model from its
checkpoint needs the architectures: :func:`b2kd.models.load_classifier` and
:func:`b2kd.models.load_generator`.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from b2kd import __version__


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or of the wrong kind."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file then rename, so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read(path: str | Path, kind: str | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, TypeError, pickle.UnpicklingError):
        raise CheckpointError(f"cannot read checkpoint {path}: not a torch file, or corrupted") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise CheckpointError(f"{path} is not a b2kd checkpoint")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"{path} holds a {ckpt['kind']}, expected a {kind}")
    return ckpt


def resume_mismatch(path: str | Path, detail: str) -> CheckpointError:
    """The error of a resumed run whose checkpoint was made with other settings."""
    return CheckpointError(f"cannot resume from {path}: {detail}; run with the settings that made it,"
                           " or into a fresh output directory")


def load_resumed(target: Any, state: dict, path: str | Path, what: str) -> None:
    """``target.load_state_dict(state)`` for a resumed run; a checkpoint made with other settings
    (another architecture, optimiser or discriminator) is one :class:`CheckpointError`."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise resume_mismatch(path, f"its {what} was made with other settings ({reason[:200]})") from None


def module_checkpoint(kind: str, module: torch.nn.Module, **meta: Any) -> dict:
    """The dict a model is saved as: its build arguments, weights and metadata."""
    return {
        "kind": kind,
        "config": dict(module.config),
        "state_dict": module.state_dict(),
        "meta": {"b2kd_version": __version__, **meta},
    }


def save_classifier(model: torch.nn.Module, path: str | Path, **meta: Any) -> None:
    atomic_save(module_checkpoint("classifier", model, **meta), path)


def save_generator(generator: torch.nn.Module, path: str | Path, **meta: Any) -> None:
    atomic_save(module_checkpoint("generator", generator, **meta), path)
