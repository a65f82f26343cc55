"""Step two: pay for a pool of synthetic queries once, then train the student over it.

The pool's last ``val_fraction`` (after a seeded shuffle) is held out: the
student's top-1 agreement with the teacher's paid answers on it chooses
``best.pt``. The test set is never looked at here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from b2kd.blackbox import to_probs, top1
from b2kd.core import distributed
from b2kd.core.checkpoint import atomic_save
from b2kd.core.config import Config
from b2kd.core.engine import Engine, make_optimizer, make_step_scheduler
from b2kd.core.runtime import fast_layout
from b2kd.data import Augment
from b2kd.data.augment import StrongAugment
from b2kd.distill.methods import get_method
from b2kd.distill.methods.base import Acquisition
from b2kd.distill.semisup import DomainMixup, LocalUnlabelled
from b2kd.distill.step import combined, train_step
from b2kd.edge import BlackBoxTeacher
from b2kd.models import build_model

#: The pool's held-out slice and the teacher's top-1 on it, as a run writes them (for
#: b2kd.evaluate.synthetic_gap's synthetic-vs-real table).
VAL_SLICE = "val-slice.pt"


def split_pool(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) indices into the pool."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    n_val = round(n * val_fraction)
    return perm[n_val:], perm[:n_val]


def new_student(cfg: Config, teacher: BlackBoxTeacher, device: torch.device) -> torch.nn.Module:
    """The student as the run's seed initialises it (the same weights whenever it is made)."""
    channels, size, _ = teacher.image_shape
    torch.manual_seed(cfg.seed)
    return fast_layout(build_model(cfg.distill.student, teacher.num_classes, channels, size).to(device))


class Fitter:
    """``fit`` of :class:`Acquisition`: a short round of training on a partial pool (active methods
    retrain between queries); ``rounds`` says whether it ran."""

    def __init__(self, method, student: torch.nn.Module, d, seed: int, augment, device: torch.device):
        self.method, self.student, self.d, self.seed = method, student, d, seed
        self.augment, self.device = augment, device
        self.rounds: list[int] = []

    def __call__(self, pool: torch.Tensor, answers: torch.Tensor, steps: int) -> None:
        d = self.d
        self.rounds.append(steps)
        self.method.prepare(answers, self.device)
        pool = pool.to(self.device)
        opt = make_optimizer(self.student, d.lr, d.momentum, d.weight_decay)
        rng = torch.Generator().manual_seed(self.seed + len(pool))
        self.student.train()
        for _ in range(steps):
            idx = torch.randint(len(pool), (min(d.batch_size, len(pool)),), generator=rng).to(self.device)
            train_step(self.method, self.student, opt, self.augment(pool[idx], generator=rng), idx, d.grad_clip)


@dataclass
class Plan:
    """How long the student trains: global batch, steps per epoch, the schedule's length in steps,
    and the steps and epochs actually run (``distill.max_steps`` may stop it earlier)."""

    batch: int
    steps_per_epoch: int
    schedule_steps: int
    total_steps: int
    epochs: int

    @classmethod
    def of(cls, d, train_size: int) -> Plan:
        batch = d.batch_size * distributed.world_size()  # the effective batch: per rank x world size
        steps_per_epoch = math.ceil(train_size / batch)
        # distill.steps fixes the training length whatever the pool's size (budget sweeps compare
        # methods at equal compute); the schedule then spans ceil(steps / steps per epoch) epochs
        schedule_steps = d.steps if d.steps is not None else d.epochs * steps_per_epoch
        total_steps = schedule_steps if d.max_steps is None else min(schedule_steps, d.max_steps)
        return cls(batch, steps_per_epoch, schedule_steps, total_steps, math.ceil(total_steps / steps_per_epoch))


def optimisation(cfg: Config, student: torch.nn.Module, plan: Plan, embeddings, device: torch.device):
    """(optimizer, step scheduler, gray-box feature term or None) of the final student."""
    d = cfg.distill
    optimizer = make_optimizer(student, distributed.scaled_lr(d.lr, cfg.distributed.scale_lr), d.momentum,
                               d.weight_decay)
    features = None
    if embeddings is not None:
        from b2kd.distill.feature_match import FeatureMatch

        features = FeatureMatch(student, embeddings, d.feature_weight, device, cfg.seed)
        optimizer.add_param_group({"params": list(features.proj.parameters())})  # same lr and schedule
    # stepped after every optimisation step, so the schedule ends with training (milestones are
    # given in epochs, as in the reference recipe)
    scheduler = make_step_scheduler(optimizer, d.schedule, plan.schedule_steps,
                                    min(d.warmup_steps, plan.schedule_steps),
                                    tuple(m * plan.steps_per_epoch for m in d.milestones))
    return optimizer, scheduler, features


def on_device_terms(d, student: torch.nn.Module, unlabelled: torch.Tensor | None, augment,
                    device: torch.device,
                    pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> list:
    """The terms that read the private images on the device (never sent): the semi-supervised
    term of ``distill.local_unlabelled`` and, with ``distill.domain_mixup``, the inter-domain mixup
    of the paid ``pool`` (images, the teacher's answers as probabilities, the training indices)
    with them; each is ``term(rng) -> (loss, parts)``."""
    if not d.local_unlabelled:
        return []
    if unlabelled is None:
        raise ValueError("distill.local_unlabelled is set, but no private images were given")
    batch = max(1, round(d.batch_size * d.unlabelled_ratio))
    local = LocalUnlabelled(unlabelled, batch, d.unlabelled_threshold, d.unlabelled_weight, augment,
                            StrongAugment(), device)
    terms = [lambda rng: local.loss(student, rng)]
    if d.domain_mixup > 0 and pool is not None:
        mix = DomainMixup(unlabelled, *pool, batch, d.domain_mixup, augment, device)
        terms.append(lambda rng: mix.loss(student, rng))
    return terms


class Trainer:
    """The epochs of :class:`b2kd.core.engine.Engine` over the paid pool: train, validate, report."""

    def __init__(self, d, method, student, trainee, optimizer, scheduler, features, terms, augment,
                 images: torch.Tensor, teacher_top1: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor],
                 plan: Plan, device: torch.device, label: str, log):
        self.d, self.method, self.student, self.trainee = d, method, student, trainee
        self.optimizer, self.scheduler, self.features, self.terms = optimizer, scheduler, features, terms
        self.augment, self.images, self.teacher_top1 = augment, images, teacher_top1
        self.train_idx, self.val_idx = split
        self.plan, self.device, self.label, self.log = plan, device, label, log
        self.timing = {"images": 0, "seconds": 0.0}

    def train_epoch(self, epoch: int, rng: torch.Generator) -> dict:
        plan, d = self.plan, self.d
        order = self.train_idx[torch.randperm(len(self.train_idx), generator=rng)]
        totals: dict[str, float] = {}
        steps = min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)
        start = time.perf_counter()
        for step in range(steps):
            idx = order[step * plan.batch : (step + 1) * plan.batch].to(self.device)
            extra = combined(self.terms, rng)
            # every rank augments the whole batch (the same draws as one process) and trains on its part
            idx, x, weight = distributed.my_part(idx, self.augment(self.images[idx], generator=rng))
            loss, parts = train_step(self.method, self.trainee, self.optimizer, x, idx, d.grad_clip, extra,
                                     weight, self.features)
            self.scheduler.step()
            for key, value in {"loss": loss.item(), **parts}.items():
                totals[key] = totals.get(key, 0.0) + value
        seconds = time.perf_counter() - start
        n_images = min(steps * plan.batch, len(order))
        self.timing["images"] += n_images
        self.timing["seconds"] += seconds
        return distributed.mean_over_ranks(
            {**{k: v / max(steps, 1) for k, v in totals.items()}, "img_per_s": n_images / seconds})

    @torch.no_grad()
    def validate(self) -> float:
        """Top-1 agreement with the teacher's paid answers on the held-out slice."""
        agree = 0
        for i in range(0, len(self.val_idx), 1000):
            idx = self.val_idx[i : i + 1000].to(self.device)
            agree += int((self.student(self.images[idx]).argmax(1) == self.teacher_top1[idx]).sum())
        return agree / len(self.val_idx)

    def report_epoch(self, r: dict) -> None:
        val = f" val-agree {r['val']:.4f}" if "val" in r else ""
        self.log(f"{self.label} epoch {r['epoch'] + 1}/{self.plan.epochs}: loss {r['loss']:.4f}"
                 f"{val} {r['img_per_s']:.0f} img/s ({r['seconds']:.0f}s)")

    def train_images_per_s(self) -> float | None:
        return self.timing["images"] / self.timing["seconds"] if self.timing["seconds"] else None


def distill(
    cfg: Config,
    teacher: BlackBoxTeacher,
    generator: torch.nn.Module | None,
    out: str | Path,
    device: torch.device,
    on_paid=None,
    log=print,
    private: torch.Tensor | None = None,
    local_model: torch.nn.Module | None = None,
    unlabelled: torch.Tensor | None = None,
    setup: tuple[torch.Tensor, torch.Tensor] | None = None,
    discriminator: torch.nn.Module | None = None,
) -> dict:
    """Run one distillation; returns a summary (queries, throughput, selection).

    ``private`` (the edge's local images) is read only by methods whose queries
    come from local data; generator methods never see it. ``unlabelled`` (the
    same images, with ``distill.local_unlabelled``) trains the student on the
    device and is never given to the teacher. ``local_model`` (the teacher's
    own network) reaches white-box methods only. ``discriminator`` (deprivatization's D)
    scores the balanced pool's candidates with ``distill.balance_realism``.
    """
    out = Path(out)
    d = cfg.distill
    method = get_method(d.method)(d, teacher.kind, generator)
    first = new_student(cfg, teacher, device)
    augment = Augment(crop_padding=d.crop_padding)
    fit = Fitter(method, first, d, cfg.seed, augment, device)
    if method.source == "local" and private is None:
        raise ValueError(f"method '{d.method}' queries local images, but none were given")
    acq = Acquisition(
        teacher=teacher, budget=d.budget, seed=cfg.seed, device=device, out=out, student=first,
        fit=fit, generator=generator, private=private, query_batch=d.query_batch, on_paid=on_paid,
        local_model=local_model if method.white_box else None,
        setup=setup if method.source == "generator" else None,
        discriminator=discriminator,
    )
    # gray-box answers (+embedding kinds): the teacher's embeddings of the pool, read from the ledger
    with_features = teacher.kind.embedding and d.feature_weight > 0
    images, responses, *embeddings = pay_for_pool(method, acq, teacher, with_features)
    # the final student starts from the same weights whatever came before
    student = new_student(cfg, teacher, device) if fit.rounds else first
    teacher_top1 = top1(responses)
    train_idx, val_idx = split_pool(len(images), d.val_fraction, cfg.seed)
    method.prepare(responses, device)
    images, teacher_top1 = images.to(device), teacher_top1.to(device)
    trainee = distributed.wrap(student, device, cfg.distributed.sync_batchnorm)  # DDP under torchrun
    plan = Plan.of(d, len(train_idx))
    optimizer, scheduler, features = optimisation(cfg, student, plan, embeddings[0] if with_features else None,
                                                  device)
    select = d.select if len(val_idx) else "last"
    meta = {"role": "student", "method": d.method, "response": str(teacher.kind), "arch": d.student}
    extras = {"feature_projection": features.proj} if features is not None else {}
    terms = on_device_terms(d, student, unlabelled, augment, device,
                            (images, to_probs(responses, teacher.kind).to(device), train_idx))
    engine = Engine(out, student, optimizer, scheduler, plan.epochs, cfg.seed, select=select, meta=meta,
                    schedule_per="step", writes=distributed.is_main(), extras=extras)
    if engine.resume(distributed.checkpoint_from_rank0(engine.latest_path)):
        log(f"resuming distillation at epoch {engine.start_epoch + 1}/{plan.epochs}")
    trainer = Trainer(d, method, student, trainee, optimizer, scheduler, features, terms, augment, images,
                      teacher_top1, (train_idx, val_idx), plan, device, f"{d.method}/{teacher.kind}", log)
    summary = engine.run(trainer.train_epoch, trainer.validate if len(val_idx) else None, trainer.report_epoch)
    if distributed.is_main() and len(val_idx):  # what the report's synthetic-vs-real table reads
        atomic_save({"kind": "val_slice", "images": images[val_idx].cpu(),
                     "teacher_top1": teacher_top1[val_idx].cpu()}, out / VAL_SLICE)
    return {**summary, **pool_summary(teacher, images, acq, embeddings[0] if with_features else None),
            "val_size": len(val_idx), "train_img_per_s": trainer.train_images_per_s(), "select": select}


def pool_summary(teacher: BlackBoxTeacher, images: torch.Tensor, acq: Acquisition,
                 embeddings: torch.Tensor | None) -> dict:
    """What the pool cost (the ledger's totals) and what it holds."""
    totals = teacher.ledger.totals()
    return {
        "queries": totals["queries"],
        "bytes_sent": totals["bytes_sent"],
        "bytes_received": totals["bytes_received"],
        "pool_size": len(images),
        "setup_in_pool": 0 if acq.setup is None else len(acq.setup[0]),
        "embedding_dim": int(embeddings.shape[1]) if embeddings is not None else None,
        "with_embedding": int((~torch.isnan(embeddings).any(1)).sum()) if embeddings is not None else 0,
    }


def pay_for_pool(method, acq: Acquisition, teacher: BlackBoxTeacher, with_features: bool) -> tuple:
    """(images, answers[, embeddings]) of the pool: under torchrun rank 0 alone pays, and every
    rank receives the pool (b2kd.core.distributed)."""

    def acquire() -> tuple[torch.Tensor, ...]:
        images, responses = method.acquire(acq)
        return (images, responses, teacher.embeddings(images)) if with_features else (images, responses)

    return distributed.from_rank0(acquire)
