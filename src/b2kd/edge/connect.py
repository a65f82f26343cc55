"""The teacher one run queries, opened from its config: a served teacher or a local checkpoint,
behind the run's ledger and budget (and the shared cache, when there is one).

Under torchrun rank 0 alone opens it (:func:`teacher_on_rank0`); the other ranks get a
:class:`TeacherView`: its form, and no way to query it (:mod:`b2kd.core.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from b2kd.blackbox import LocalBackend, ResponseKind
from b2kd.core import distributed
from b2kd.core.config import Config, ConfigError
from b2kd.edge.cache import SharedCache
from b2kd.edge.ledger import Ledger
from b2kd.edge.teacher import BlackBoxTeacher


def teacher_checkpoint(cfg: Config) -> Path:
    """The teacher checkpoint the config names (to query in-process, or to evaluate against)."""
    if not cfg.teacher.checkpoint:
        raise ConfigError("no teacher given: pass --teacher PATH (or set teacher.checkpoint)")
    return Path(cfg.teacher.checkpoint)


def open_teacher(cfg: Config, run_dir: Path, response: str, budget: int | None, stage: str) -> BlackBoxTeacher:
    """The black-box teacher of one run: backend + this run's ledger + budget.

    The backend is the served teacher at ``teacher.url`` when there is one (its
    response kind is the server's, so it must be the one this stage asks for),
    else the checkpoint run in-process.
    """
    kind = ResponseKind.parse(response)
    if cfg.teacher.url:
        from b2kd.edge.client import HTTPTeacher

        backend = HTTPTeacher.from_config(cfg.teacher)
        if backend.kind.embedding and backend.kind.base == kind:
            backend.without_embedding()  # a gray-box server also answers plain probabilities
        if backend.kind != kind:
            backend.close()
            raise ConfigError(f"the teacher at {backend.url} answers '{backend.kind}' responses but"
                              f" {stage}.response is '{kind}'; ask for '{backend.kind}'")
    else:
        backend = LocalBackend.from_checkpoint(teacher_checkpoint(cfg), kind)
    if cfg.teacher.shared_cache:
        shared = Ledger(cfg.teacher.shared_cache)
        try:  # refused when it holds another provider's answers: the client and the ledger close
            backend = SharedCache(backend, shared, stage, allow_mixed_providers=cfg.teacher.allow_mixed_providers)
        except BaseException:
            shared.close()
            getattr(backend, "close", lambda: None)()
            raise
    return BlackBoxTeacher(backend, Ledger(run_dir / "ledger.sqlite"), budget=budget, stage=stage,
                           allow_mixed_providers=cfg.teacher.allow_mixed_providers)


class TeacherView:
    """What the ranks other than 0 know of the teacher: its form, and no way to query it."""

    def __init__(self, kind: str, num_classes: int, image_shape: tuple[int, int, int], budget: int | None):
        self.kind = ResponseKind.parse(kind)
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.budget = budget
        self.ledger = _NoLedger()
        self.spent = 0
        self.remaining = budget

    def query(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"rank {distributed.rank()} may not query the teacher: rank 0 pays for every query")


class _NoLedger:
    """A rank other than 0 pays nothing: its totals are zero; rank 0's ledger holds the run's."""

    def totals(self, stage: str | None = None) -> dict[str, int]:
        return {"queries": 0, "bytes_sent": 0, "bytes_received": 0}

    def count(self, stage: str | None = None) -> int:
        return 0

    def close(self) -> None:
        pass


def teacher_on_rank0(open_teacher: Callable[[], Any], budget: int | None):
    """The teacher on rank 0 (``open_teacher()``); a :class:`TeacherView` of it on the others."""
    if distributed.world_size() == 1:
        return open_teacher()
    teacher, form = distributed.on_rank0(open_teacher, "opening the teacher",
                                         lambda t: (str(t.kind), t.num_classes, t.image_shape))
    return teacher if distributed.is_main() else TeacherView(*form, budget)
