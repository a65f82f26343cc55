"""Name -> constructor registry for classifiers.

Checkpoints store ``model.config``; ``build_model(**config)`` rebuilds the same
architecture, so a run directory never needs to pickle model classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .normalize import Classifier

ModelFactory = Callable[..., Classifier]

MODELS: dict[str, ModelFactory] = {}


def register(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator adding a factory ``f(num_classes, in_channels, image_size, **kw)``."""

    def add(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"architecture {name!r} is already registered")
        MODELS[name] = factory
        return factory

    return add


def available_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(MODELS)


def build_model(
    arch: str,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 32,
    **kwargs: Any,
) -> Classifier:
    """Build a registered classifier and record how it was built.

    Extra keyword arguments (e.g. ``mean``, ``std``, ``width_mult``) go to the
    architecture's constructor and are kept in ``model.config``.
    """
    try:
        factory = MODELS[arch]
    except KeyError:
        raise ValueError(
            f"unknown architecture {arch!r}; choose from: {', '.join(available_models())}"
        ) from None
    model = factory(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs
    )
    model.arch = arch
    model.config = {
        "arch": arch,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        **kwargs,
    }
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as mean/std are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
