"""The one interface every teacher backend implements (in-process now, HTTP later)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from b2kd.blackbox.responses import ResponseKind


@dataclass
class BackendAnswer:
    """What one call to a backend returned: API-form rows and the bytes each way."""

    responses: torch.Tensor  # (N, K) float32, API form
    bytes_sent: list[int]  # per image
    bytes_received: list[int]  # per image
    embeddings: torch.Tensor | None = None  # (N, D) float32 for a ``+embedding`` kind, else None


class Backend(Protocol):
    """A teacher reachable only by sending uint8 images."""

    kind: ResponseKind
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W) the API accepts
    embedding_dim: int | None  # D of a ``+embedding`` kind's vectors (None: no embedding)

    def infer(self, images: torch.Tensor) -> BackendAnswer: ...


class BlackBoxError(Exception):
    """A query that cannot be made (budget, shape, server refusal); nothing paid is lost."""


class BudgetExceeded(BlackBoxError):
    """The query would spend more than the budget allows; nothing was sent."""


class TeacherRefused(BlackBoxError):
    """The teacher's server refused a request (key, size, malformed); that request was not paid."""


class QuotaExceeded(TeacherRefused):
    """The server's query quota for this API key is spent; responses paid before are kept."""


class TeacherUnavailable(BlackBoxError):
    """The teacher's server could not be reached, even after every retry."""
