"""The black-box teacher as every stage sees it: query(uint8 images) -> responses.

Wraps any backend with the ledger (every paid query recorded, repeated images
served from the cache for free) and the budget (a query that would overspend
is refused before anything is sent). Answers are recorded one backend request
at a time, so an error in a later request loses nothing paid before it.

When the server says how much of its quota is left (b2kd's 402 does), the last
request shrinks to it, so a key's quota is spent to the last query. Answers
refused on arrival are counted in the ledger, never stored; and a ledger
holding answers from another provider is refused unless mixing is allowed.
"""

from __future__ import annotations

import torch

from b2kd.blackbox.base import (
    Backend,
    BlackBoxError,
    BudgetExceeded,
    Provider,
    QuotaExceeded,
    Refused,
)
from b2kd.blackbox.validate import InvalidAnswer
from b2kd.edge.ledger import Ledger, image_hashes


class MixedProviders(BlackBoxError):
    """The ledger holds answers from another provider than the one now queried."""


def provider_of(backend: object) -> Provider | None:
    """Who answers through ``backend`` (a wrapper such as the shared cache: its inner backend's)."""
    for _ in range(8):  # wrappers keep the backend they wrap as .backend
        found = getattr(backend, "provider", None)
        if isinstance(found, Provider):
            return found
        backend = getattr(backend, "backend", None)
        if backend is None:
            return None
    return None


def refuse_mixed(ledger: Ledger, provider: Provider, what: str = "ledger",
                 instead: str = "use a new --out") -> None:
    """A clear refusal when ``ledger`` holds answers from another teacher than ``provider``
    (``what``: the ledger's role in the line; ``instead``: the other way out it names)."""
    others = ledger.other_providers(provider)
    if others:
        named = ", ".join(str(p) for p in others[:3]) + (" and more" if len(others) > 3 else "")
        raise MixedProviders(
            f"the {what} {ledger.path} holds answers from another provider ({named}) than the teacher"
            f" now queried ({provider}); a run's answers come from one teacher: {instead}, or set"
            " teacher.allow_mixed_providers=true to mix them")


class BlackBoxTeacher:
    def __init__(
        self,
        backend: Backend,
        ledger: Ledger,
        budget: int | None = None,
        stage: str = "distill",
        batch_size: int = 256,
        allow_mixed_providers: bool | None = None,
    ):
        """``allow_mixed_providers`` (teacher.allow_mixed_providers; None: as the backend's settings
        say, else False) lets the ledger hold answers from another provider than ``backend``'s."""
        self.backend = backend
        self.ledger = ledger
        self.budget = budget
        self.stage = stage
        self.batch_size = batch_size
        self.cache_hits = 0
        self.provider = provider_of(backend)
        if allow_mixed_providers is None:
            allow_mixed_providers = bool(getattr(backend, "allow_mixed_providers", False))
        if self.provider is not None and not allow_mixed_providers:
            refuse_mixed(ledger, self.provider)

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
            self._pay(chunk, batch, kind, known)
        return torch.stack([known[h] for h in hashes])

    def _pay(self, chunk: list[str], batch: torch.Tensor, kind: str, known: dict[str, torch.Tensor]) -> None:
        """Pay for one request's images and record them; when the quota cannot pay for all of
        them and the server says what is left, pay for that many first, then stop."""
        try:
            answer = self._infer(batch)
        except QuotaExceeded as exc:
            left = exc.remaining
            if left is None or not 0 < left < len(chunk):
                raise
            self._pay(chunk[:left], batch[:left], kind, known)  # a smaller quota left: raised from here
            raise QuotaExceeded(f"{exc} (the last {left} queries it allowed were paid and kept)", 0) from None
        try:
            self.ledger.record(chunk, batch, answer.responses, kind, answer.bytes_sent, answer.bytes_received,
                               self.stage, answer.embeddings, self.provider)
        except InvalidAnswer as exc:
            spent = Refused(len(chunk), sum(answer.bytes_sent), sum(answer.bytes_received))
            self.ledger.record_refused(spent, str(exc), self.stage, self.provider)
            raise
        known.update(zip(chunk, answer.responses.float().cpu()))

    def _infer(self, batch: torch.Tensor):
        """The backend's answer; one that arrived and was refused is counted in the ledger."""
        try:
            return self.backend.infer(batch)
        except BlackBoxError as exc:
            if exc.refused is not None:
                self.ledger.record_refused(exc.refused, str(exc), self.stage, self.provider)
            raise

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
