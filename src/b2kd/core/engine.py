"""The shared training loop: epochs, seeded shuffling, checkpoints, resume, selection.

``checkpoints/latest.pt`` is written atomically after every epoch with the
model, optimizer, scheduler and history, so re-running the same command after
an interruption (even ``kill -9``) continues from the last finished epoch.
``checkpoints/best.pt`` is the model chosen by validation (or the last epoch);
both are classifier checkpoints that ``load_classifier`` reads.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from b2kd.core.checkpoint import (
    atomic_save,
    load_resumed,
    module_checkpoint,
    read,
    resume_mismatch,
    save_classifier,
)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling RNG of one epoch: the same on a resumed run as on an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float):
    """SGD with momentum."""
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=False
    )


def make_scheduler(optimizer, schedule: str, epochs: int, milestones: list[int]):
    """A schedule stepped once per epoch (the teacher's: its published checkpoint was made so)."""
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def step_schedule_factor(step: int, total: int, schedule: str, warmup: int = 0,
                         milestones: tuple[int, ...] = ()) -> float:
    """The learning-rate multiplier after ``step`` optimisation steps of ``total``.

    ``warmup`` steps rise linearly from 1/warmup to 1; then "cosine" anneals to 0
    at ``total`` and "step" multiplies by 0.1 at each milestone (in steps).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        span = max(total - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 0.1 ** sum(step >= m for m in milestones)


#: The largest share of a run's steps its learning-rate warm-up may take.
WARMUP_SHARE = 0.1
#: Fewer training steps than this and a run is warned of: too short for its schedule to work.
MIN_STEPS = 200


def clipped_warmup(warmup: int, total_steps: int) -> int:
    """The warm-up a run of ``total_steps`` gets: the one asked for, at most a tenth of the run.

    Unclipped, a short run never trains at its learning rate: budget 2,000 for one epoch is about
    48 steps, all inside the default 50-step warm-up, and the student ended at 10-17%."""
    return max(0, min(warmup, int(total_steps * WARMUP_SHARE)))


def short_run_warning(total_steps: int, warmup: int) -> str | None:
    """A warning for a run of fewer than MIN_STEPS steps (None for a longer one)."""
    if total_steps >= MIN_STEPS:
        return None
    cut = f"; its {warmup}-step warm-up is cut to {clipped_warmup(warmup, total_steps)}" if warmup else ""
    return (f"the student trains for about {total_steps} steps, fewer than {MIN_STEPS}{cut}; a run this"
            " short may end far below what its budget allows (raise distill.epochs or set distill.steps)")


def make_step_scheduler(optimizer, schedule: str, total_steps: int, warmup: int = 0,
                        milestones: tuple[int, ...] = ()):
    """A schedule stepped after every optimisation step, so it finishes whatever the epoch count.

    The warm-up is clipped to a tenth of the run (:func:`clipped_warmup`)."""
    warmup = clipped_warmup(warmup, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: step_schedule_factor(step, total_steps, schedule, warmup, tuple(milestones)),
    )


class Engine:
    def __init__(
        self,
        run_dir: str | Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        epochs: int,
        seed: int,
        select: str = "val",
        meta: dict | None = None,
        schedule_per: str = "epoch",
        writes: bool = True,
        extras: dict[str, torch.nn.Module] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.epochs = epochs
        self.seed = seed
        self.select = select
        self.meta = meta or {}
        # "step": the caller steps the scheduler after each optimisation step
        self.schedule_per = schedule_per
        # False on the ranks of a torchrun job but rank 0: they train, rank 0 writes
        self.writes = writes
        # modules trained beside the model (a projection head): saved in latest.pt, restored on resume
        self.extras = extras or {}
        self.start_epoch = 0
        self.best_metric = float("-inf")
        self.best_epoch = -1
        self.history: list[dict] = []

    @property
    def latest_path(self) -> Path:
        return self.ckpt_dir / "latest.pt"

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "best.pt"

    def resume(self, ckpt: dict | None = None) -> bool:
        """Load ``latest.pt`` if present; returns whether training resumes.

        ``ckpt``: that checkpoint as rank 0 of a torchrun job read it (``{}``: it has none).
        """
        if ckpt is None:
            if not self.latest_path.is_file():
                return False
            ckpt = read(self.latest_path, "classifier")
        if not ckpt:
            return False
        state = ckpt["train_state"]
        path = self.latest_path
        made_with = state.get("optimizer_kind")
        # torch would load another optimiser's state (AdamW, an option of earlier b2kd versions) without
        # a word and fail at the first step
        if made_with is not None and made_with != type(self.optimizer).__name__:
            raise resume_mismatch(path, f"it was trained with {made_with}, this run uses "
                                        f"{type(self.optimizer).__name__}")
        load_resumed(self.model, ckpt["state_dict"], path, "model")
        load_resumed(self.optimizer, state["optimizer"], path, "optimiser state")
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = state["epoch"] + 1
        self.best_metric = state["best_metric"]
        self.best_epoch = state["best_epoch"]
        self.history = state["history"]
        for name, module in self.extras.items():
            if name in state.get("extras", {}):
                load_resumed(module, state["extras"][name], path, name.replace("_", " "))
        # metrics.jsonl may miss the last epoch if the process died after the checkpoint
        if not self.writes:
            return True
        with open(self.run_dir / "metrics.jsonl", "w") as fh:
            fh.writelines(json.dumps(record) + "\n" for record in self.history)
        return True

    def _save_latest(self, epoch: int) -> None:
        atomic_save(
            {
                **module_checkpoint("classifier", self.model, **self.meta, epoch=epoch),
                "train_state": {
                    "optimizer": self.optimizer.state_dict(),
                    "optimizer_kind": type(self.optimizer).__name__,
                    "scheduler": self.scheduler.state_dict(),
                    "epoch": epoch,
                    "best_metric": self.best_metric,
                    "best_epoch": self.best_epoch,
                    "history": self.history,
                    "extras": {name: m.state_dict() for name, m in self.extras.items()},
                },
            },
            self.latest_path,
        )

    def run(
        self,
        train_epoch: Callable[[int, torch.Generator], dict],
        validate: Callable[[], float] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
    ) -> dict:
        """Train the remaining epochs; returns a summary with the selection."""
        for epoch in range(self.start_epoch, self.epochs):
            start = time.perf_counter()
            self.model.train()
            record = {"epoch": epoch, **train_epoch(epoch, epoch_generator(self.seed, epoch))}
            if self.schedule_per == "epoch":
                self.scheduler.step()
            record["lr"] = self.optimizer.param_groups[0]["lr"]
            if validate is not None:
                self.model.eval()
                record["val"] = float(validate())
            record["seconds"] = time.perf_counter() - start
            metric = record.get("val", 0.0) if self.select == "val" else float(epoch)
            if self.select == "last" or validate is None or metric > self.best_metric:
                self.best_metric, self.best_epoch = metric, epoch
                if self.writes:
                    save_classifier(self.model, self.best_path, **self.meta, epoch=epoch)
            self.history.append(record)
            if self.writes:
                self._save_latest(epoch)
                with open(self.run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if on_epoch is not None:
                on_epoch(record)
        self.model.eval()
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "best_val": self.best_metric if self.select == "val" else None,
            "history": self.history,
        }
