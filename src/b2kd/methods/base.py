"""What a distillation method is: what it needs, how it spends queries, and its loss."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from b2kd.blackbox import BlackBoxError, ResponseKind
from b2kd.config import DistillConfig


class Method(ABC):
    """One distillation method.

    Class attributes declare its needs: ``source`` is where its queried images
    come from ("generator" or "local"); ``needs_soft`` refuses hard-only teachers.
    """

    name: str = ""
    source: str = "generator"
    needs_soft: bool = False

    def __init__(self, cfg: DistillConfig, kind: ResponseKind, generator: torch.nn.Module | None = None):
        if self.needs_soft and kind.is_hard:
            raise BlackBoxError(f"method '{self.name}' needs soft responses; the teacher answers '{kind}'")
        if self.source == "generator" and generator is None:
            raise BlackBoxError(f"method '{self.name}' needs a generator (run `b2kd deprivatize` first)")
        self.cfg = cfg
        self.kind = kind
        self.generator = generator

    @abstractmethod
    def prepare(self, responses: torch.Tensor, device: torch.device) -> None:
        """Turn the paid pool's API-form responses into whatever the loss reads per batch."""

    @abstractmethod
    def loss(
        self, student: torch.nn.Module, images: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on one batch: ``images`` are pool images at pool indices ``idx``."""
