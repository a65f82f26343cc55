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


@dataclass(frozen=True)
class Provider:
    """Who answered: the teacher's URL, its model's name and version (v2 metadata), its response kind.

    Recorded with every paid answer, so that a ledger never mixes two teachers' answers unnoticed
    (a resumed run pointed at another server would otherwise train on both). Two providers are
    the same teacher when URL, model and version agree; the kind is recorded, not compared, as
    answers of different kinds are never served for one another anyway.
    """

    url: str
    model: str = ""
    version: str = ""
    response: str = ""

    def same_teacher(self, other: Provider) -> bool:
        return (self.url, self.model, self.version) == (other.url, other.model, other.version)

    def __str__(self) -> str:
        named = f" (model '{self.model}'" + (f" version {self.version})" if self.version else ")")
        return self.url + (named if self.model else "")


@dataclass(frozen=True)
class Refused:
    """What an answer that arrived and was refused cost: kept in the ledger beside what was paid."""

    images: int
    bytes_sent: int
    bytes_received: int


class Backend(Protocol):
    """A teacher reachable only by sending uint8 images."""

    kind: ResponseKind
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W) the API accepts
    embedding_dim: int | None  # D of a ``+embedding`` kind's vectors (None: no embedding)

    def infer(self, images: torch.Tensor) -> BackendAnswer: ...


class BlackBoxError(Exception):
    """A query that cannot be made (budget, shape, server refusal); nothing paid is lost.

    ``refused`` is set when an answer did arrive and was refused (malformed, invalid, too
    large): the ledger counts it, so a report shows what was received and refused.
    """

    refused: Refused | None = None


class BudgetExceeded(BlackBoxError):
    """The query would spend more than the budget allows; nothing was sent."""


class TeacherRefused(BlackBoxError):
    """The teacher's server refused a request (key, size, malformed); that request was not paid."""


class QuotaExceeded(TeacherRefused):
    """The server's query quota for this API key is spent; responses paid before are kept.

    ``remaining`` is what the server says is left of the quota (None: it did not say), so the
    last request can shrink to it and the quota be spent to the last query.
    """

    def __init__(self, message: str, remaining: int | None = None):
        super().__init__(message)
        self.remaining = remaining


class TeacherUnavailable(BlackBoxError):
    """The teacher's server could not be reached, even after every retry."""
