"""Distillation methods, one file each, found by name."""

from b2kd.methods.base import Method
from b2kd.methods.knockoff import Knockoff
from b2kd.methods.mekd import MEKD

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (MEKD, Knockoff)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose from: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "Method", "get_method"]
