"""Distillation methods, one file each, found by name.

Every module of this package is imported and each ``Method`` subclass with a
``name`` is registered: a new method is a new file.
"""

import importlib
import pkgutil

from b2kd.distill.methods.base import Acquisition, Method


def _discover() -> dict[str, type[Method]]:
    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Method) and obj.name and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return found


METHODS: dict[str, type[Method]] = _discover()


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose from: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "Acquisition", "Method", "get_method"]
