"""The black-box teacher as every stage sees it: query(uint8 images) -> responses.

Wraps any backend with the ledger (every paid query recorded, repeated images
served from the cache for free) and the budget (a query that would overspend
is refused before anything is sent). Answers are recorded one backend request
at a time, so an error in a later request loses nothing paid before it.
"""

from __future__ import annotations

import torch

from b2kd.blackbox.base import Backend, BudgetExceeded
from b2kd.edge.ledger import Ledger, image_hashes


class BlackBoxTeacher:
    def __init__(
        self,
        backend: Backend,
        ledger: Ledger,
        budget: int | None = None,
        stage: str = "distill",
        batch_size: int = 256,
    ):
        self.backend = backend
        self.ledger = ledger
        self.budget = budget
        self.stage = stage
        self.batch_size = batch_size
        self.cache_hits = 0

    @property
    def kind(self):
        return self.backend.kind

    @property
    def num_classes(self) -> int:
        return self.backend.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.backend.image_shape

    @property
    def spent(self) -> int:
        """Queries paid in this ledger so far (every stage but the evaluation ones: they spend no budget)."""
        return self.ledger.count()

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else max(self.budget - self.spent, 0)

    def unpaid(self, images: torch.Tensor) -> int:
        """How many distinct images of ``images`` a query would pay for."""
        hashes = set(image_hashes(images))
        return len(hashes - set(self.ledger.lookup(list(hashes), str(self.kind))))

    def check_budget(self, images: torch.Tensor) -> None:
        """Refuse up front a set of images that cannot all be paid for, before any is sent."""
        if self.budget is None:
            return
        need = self.unpaid(images)
        if self.spent + need > self.budget:
            raise BudgetExceeded(
                f"query budget too small: {self.spent} of {self.budget} queries spent and"
                f" {need} more needed; nothing was sent"
            )

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """API-form responses (N, K) for uint8 images (N, C, H, W)."""
        hashes = image_hashes(images)
        kind = str(self.kind)
        known = self.ledger.lookup(hashes, kind)
        first_new: dict[str, int] = {}
        for i, h in enumerate(hashes):
            if h not in known and h not in first_new:
                first_new[h] = i
        self.cache_hits += len(hashes) - len(first_new)
        if self.budget is not None and self.spent + len(first_new) > self.budget:
            raise BudgetExceeded(
                f"query budget exhausted: {self.spent} of {self.budget} queries spent and"
                f" {len(first_new)} more requested; nothing was sent"
            )
        new_hashes = list(first_new)
        step = min(self.batch_size, getattr(self.backend, "batch_size", None) or self.batch_size)
        for start in range(0, len(new_hashes), step):
            chunk = new_hashes[start : start + step]
            batch = images[[first_new[h] for h in chunk]].contiguous()
            answer = self.backend.infer(batch)
            self.ledger.record(
                chunk,
                batch,
                answer.responses,
                kind,
                answer.bytes_sent,
                answer.bytes_received,
                self.stage,
                answer.embeddings,
            )
            known.update(zip(chunk, answer.responses.float().cpu()))
        return torch.stack([known[h] for h in hashes])

    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's embeddings (N, D) of images already paid with a ``+embedding`` kind;
        NaN rows for the images that have none (answers paid with another kind, such as
        deprivatization's). Nothing is sent."""
        if not self.kind.embedding:
            raise ValueError(f"the teacher answers '{self.kind}': no embedding (serve it with"
                             " --response soft+embedding)")
        hashes = image_hashes(images)
        found = self.ledger.lookup_embeddings(hashes, str(self.kind))
        dim = self.backend.embedding_dim or (len(next(iter(found.values()))) if found else 1)
        missing = torch.full((dim,), float("nan"))
        return torch.stack([found.get(h, missing) for h in hashes])
