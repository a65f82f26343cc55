"""What a classification API answers, and how b2kd turns an answer into training targets.

Every response is kept in its *API form*: a float32 row of K values per image.
``soft`` rows are probabilities, ``topk:k`` rows hold the k largest probabilities
and NaN where the API said nothing, ``rounded:d`` rows hold probabilities rounded
to d decimals, and ``hard`` rows are one-hot. One dense form for every kind keeps
the ledger, the cache and the HTTP client identical across kinds.

A gray-box API also discloses the teacher's penultimate-layer embedding: the kind
``soft+embedding`` (``embedding`` for short; any kind takes ``+embedding``) has the
same API-form rows as its base kind, and each answer carries a float32 vector of D
values beside them (stored apart in the ledger, :mod:`b2kd.edge.ledger`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

_PATTERN = re.compile(r"^(soft|hard|topk:(\d+)|rounded:(\d+))(\+embedding)?$")

#: The suffix of a kind whose answers carry the teacher's embedding.
EMBEDDING = "+embedding"

#: Probabilities are clamped to at least this before taking logs (log 0 is -inf).
PROB_FLOOR = 1e-6


class ResponseKindError(ValueError):
    """A response kind string that b2kd does not understand."""


@dataclass(frozen=True)
class ResponseKind:
    """One of ``soft``, ``topk:k``, ``rounded:d`` or ``hard``, with or without ``+embedding``."""

    name: str
    param: int | None = None
    embedding: bool = False  # each answer also carries the teacher's penultimate embedding

    @classmethod
    def parse(cls, text: str | ResponseKind) -> ResponseKind:
        if isinstance(text, ResponseKind):
            return text
        value = str(text).strip()
        if value == "embedding":
            value = "soft" + EMBEDDING
        match = _PATTERN.match(value)
        if not match:
            raise ResponseKindError(
                f"unknown response kind '{text}'; use soft, hard, topk:K or rounded:D,"
                f" optionally with {EMBEDDING} (embedding: soft{EMBEDDING})"
            )
        name = match.group(1).split(":")[0]
        param = match.group(2) or match.group(3)
        if name == "topk" and int(param) < 1:
            raise ResponseKindError("topk:K needs K >= 1")
        return cls(name, int(param) if param is not None else None, match.group(4) is not None)

    def __str__(self) -> str:
        base = self.name if self.param is None else f"{self.name}:{self.param}"
        return base + (EMBEDDING if self.embedding else "")

    @property
    def base(self) -> ResponseKind:
        """The same kind without the embedding (what the probability rows follow)."""
        return ResponseKind(self.name, self.param)

    @property
    def is_hard(self) -> bool:
        return self.name == "hard"

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        """Turn full teacher probabilities (N, K) into what this API returns."""
        probs = probs.detach().float()
        if self.name == "soft":
            return probs.clone()
        if self.name == "hard":
            return torch.nn.functional.one_hot(probs.argmax(1), probs.shape[1]).float()
        if self.name == "rounded":
            scale = 10.0**self.param
            return torch.round(probs * scale) / scale
        k = min(self.param, probs.shape[1])
        out = torch.full_like(probs, math.nan)
        top = probs.topk(k, dim=1)
        return out.scatter_(1, top.indices, top.values)

    def wire_bytes(self, num_classes: int, embedding_dim: int = 0) -> int:
        """Bytes one response takes in a compact binary encoding (in-process accounting)."""
        extra = 4 * embedding_dim if self.embedding else 0  # float32 per embedding value
        if self.name == "hard":
            return 4 + extra  # one int32 class index
        if self.name == "topk":
            return 8 * min(self.param, num_classes) + extra  # int32 index + float32 value each
        return 4 * num_classes + extra  # float32 per class


def to_probs(api: torch.Tensor, kind: ResponseKind | str) -> torch.Tensor:
    """A full probability vector per row, filling in what the API left out.

    top-k: the unreported mass is spread evenly over the unreported classes.
    rounded: negatives are impossible; rows are renormalised to sum to one.
    """
    kind = ResponseKind.parse(kind)
    api = api.float()
    if kind.name in ("soft", "hard"):
        return api.clone()
    if kind.name == "rounded":
        p = api.clamp_min(0)
        total = p.sum(1, keepdim=True)
        uniform = torch.full_like(p, 1.0 / p.shape[1])
        return torch.where(total > 0, p / total.clamp_min(1e-12), uniform)
    known = ~torch.isnan(api)
    mass = torch.where(known, api, torch.zeros_like(api))
    rest = (1.0 - mass.sum(1, keepdim=True)).clamp_min(0)
    n_unknown = (~known).sum(1, keepdim=True).clamp_min(1)
    return torch.where(known, mass, rest / n_unknown)


def centre(logits: torch.Tensor) -> torch.Tensor:
    """Subtract the per-row mean: logits recovered from probabilities are defined up to a constant."""
    return logits - logits.mean(dim=1, keepdim=True)


def teacher_logits(api: torch.Tensor, kind: ResponseKind | str) -> torch.Tensor:
    """Centred teacher logits from an API response (spec section 3, step 2).

    soft-like kinds: centre(log p) with p clamped to PROB_FLOOR.
    hard: centre(one-hot) = one-hot - 1/K, centred the same way as the student side.
    """
    kind = ResponseKind.parse(kind)
    if kind.is_hard:
        return centre(api.float())
    return centre(torch.log(to_probs(api, kind).clamp_min(PROB_FLOOR)))


def top1(api: torch.Tensor) -> torch.Tensor:
    """The teacher's label per row (NaN-safe for top-k rows)."""
    return torch.nan_to_num(api.float(), nan=-1.0).argmax(1)
