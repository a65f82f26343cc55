"""What a distillation method is: what it needs, how it spends queries, and its loss."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from b2kd.blackbox import BlackBoxError, ResponseKind, teacher_logits
from b2kd.core.config import DistillConfig
from b2kd.distill.losses import kd_kl, label_cross_entropy
from b2kd.edge import BlackBoxTeacher


@dataclass
class Acquisition:
    """Everything a method may use to choose its queries and pay for them.

    ``fit(images, responses, steps)`` trains ``student`` briefly on a pool with
    the method's own loss (active methods retrain between rounds of queries).
    ``local_model`` is the teacher's own network, given only to white-box
    methods and only when the teacher runs in-process.
    """

    teacher: BlackBoxTeacher
    budget: int
    seed: int
    device: torch.device
    out: Path
    student: torch.nn.Module
    fit: Callable[[torch.Tensor, torch.Tensor, int], None]
    generator: torch.nn.Module | None = None
    private: torch.Tensor | None = None
    query_batch: int = 500
    on_paid: Callable[[int], None] | None = None
    local_model: torch.nn.Module | None = None
    setup: tuple[torch.Tensor, torch.Tensor] | None = None  # deprivatization's paid (images, answers)
    discriminator: torch.nn.Module | None = None  # deprivatization's D (distill.balance_realism)


class Method(ABC):
    """One distillation method.

    Class attributes declare its needs: ``source`` is where its queried images
    come from ("generator" or "local"); ``needs_soft`` refuses hard-only
    teachers; ``white_box`` marks a method that reads the teacher's weights
    and gradients (it is refused when the teacher is remote, and labelled as
    such in every table).
    """

    name: str = ""
    source: str = "generator"
    needs_soft: bool = False
    white_box: bool = False

    def __init__(self, cfg: DistillConfig, kind: ResponseKind, generator: torch.nn.Module | None = None):
        if self.needs_soft and kind.is_hard:
            raise BlackBoxError(f"method '{self.name}' needs soft responses; the teacher answers '{kind}'")
        if self.source == "generator" and generator is None:
            raise BlackBoxError(f"method '{self.name}' needs a generator (run `b2kd deprivatize` first)")
        self.cfg = cfg
        self.kind = kind
        self.generator = generator

    def acquire(self, acq: Acquisition) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the pool and pay for it: (uint8 images, their API-form responses).

        The default pays once for a fixed pool: ``budget`` generator images, or a
        transfer set of local images. Pools are stored in the run directory and
        responses in the ledger, so a resumed run pays nothing twice.
        """
        from b2kd.pool.paid import load_or_sample_private, load_or_synthesise, pay

        if self.source == "local":  # distill() has checked that local images were given
            images = load_or_sample_private(acq.private, acq.budget, acq.seed, acq.out / "pool.pt",
                                            copies=self.cfg.transfer_copies)
            responses = pay(acq.teacher, images, acq.query_batch, acq.on_paid)
        elif self.cfg.pool == "balanced":
            from b2kd.pool.balanced import balanced_pool

            images, responses = balanced_pool(acq, self.cfg.balance_first, self.cfg.balance_candidates,
                                              self.cfg.balance_fit_steps, acq.teacher.num_classes,
                                              self.cfg.balance_neighbours, self.cfg.balance_realism)
        else:
            images = load_or_synthesise(acq.generator, acq.budget, acq.seed, acq.out / "pool.pt")
            responses = pay(acq.teacher, images, acq.query_batch, acq.on_paid)
        if acq.setup is not None:  # paid during deprivatization: free to train on
            images, responses = torch.cat([images, acq.setup[0]]), torch.cat([responses, acq.setup[1]])
        return images, responses

    @torch.no_grad()
    def prepare(self, responses: torch.Tensor, device: torch.device) -> None:
        """Turn the paid pool's responses into what the loss reads per batch: by default the
        centred teacher logits (log-probs; one-hot minus 1/K for hard answers)."""
        self.t_logits = teacher_logits(responses, self.kind).to(device)

    def match(
        self, logits: torch.Tensor, idx: torch.Tensor, tau: float | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of the methods that train on stored answers as they are: tau^2 KL at
        ``tau`` (default ``distill.tau``), or cross-entropy on the teacher's label for hard
        answers with ``distill.hard_loss=ce``."""
        if self.kind.is_hard and self.cfg.hard_loss == "ce":
            loss = label_cross_entropy(logits, self.t_logits[idx])
        else:
            loss = kd_kl(logits, self.t_logits[idx], self.cfg.tau if tau is None else tau)
        return loss, {"match": float(loss.detach())}

    @abstractmethod
    def loss(
        self, student: torch.nn.Module, images: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on one batch: ``images`` are pool images at pool indices ``idx``."""
