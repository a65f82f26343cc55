"""Step two: pay for a pool of synthetic queries once, then train the student over it.

The pool's last ``val_fraction`` (after a seeded shuffle) is held out: the
student's top-1 agreement with the teacher's paid answers on it chooses
``best.pt``. The test set is never looked at here.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from b2kd.core import distributed
from b2kd.blackbox import top1
from b2kd.edge import BlackBoxTeacher
from b2kd.core.checkpoint import atomic_save
from b2kd.core.config import Config
from b2kd.data import Augment
from b2kd.data.augment import StrongAugment
from b2kd.core.engine import Engine, make_optimizer, make_step_scheduler
from b2kd.distill.methods import get_method
from b2kd.distill.methods.base import Acquisition
from b2kd.models import build_model
from b2kd.core.runtime import fast_layout
from b2kd.distill.semisup import LocalUnlabelled

#: The pool's held-out slice and the teacher's top-1 on it, as a run writes them (for
#: b2kd.evaluate.synthetic_gap's synthetic-vs-real table).
VAL_SLICE = "val-slice.pt"


def device_terms(d, student: torch.nn.Module, private: torch.Tensor | None, anchor_targets, augment,
                 device: torch.device) -> list:
    """The loss terms that read private images on the device (never sent): the anchored images'
    transferred labels and CORAL feature alignment; each is ``term(rng) -> (loss, parts)``."""
    terms = []
    if anchor_targets is not None and d.anchor_weight > 0:
        from b2kd.pool.anchored import AnchorLabels

        labels = AnchorLabels(private, *anchor_targets, d.batch_size, d.anchor_weight, augment, device)
        terms.append(lambda rng: labels.loss(student, rng))
    if d.coral_weight > 0:
        if private is None:
            raise ValueError("distill.coral_weight needs the private images on the device, but none were given")
        from b2kd.distill.coral import CoralAlign

        align = CoralAlign(student, private, d.batch_size, d.coral_weight, augment, device)
        terms.insert(0, lambda rng: align.loss(student, rng))  # first: it reads the paid batch's features
    return terms


def combined(terms: list, rng: torch.Generator):
    """``extra()`` for :func:`train_step`: the sum of the terms and their parts (None without terms)."""
    if not terms:
        return None

    def extra() -> tuple[torch.Tensor, dict[str, float]]:
        total, parts = 0.0, {}
        for term in terms:
            loss, more = term(rng)
            total, parts = total + loss, {**parts, **more}
        return total, parts

    return extra


def split_pool(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) indices into the pool."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    n_val = round(n * val_fraction)
    return perm[n_val:], perm[:n_val]


def train_step(method, student: torch.nn.Module, optimizer, images: torch.Tensor, idx: torch.Tensor,
               grad_clip: float | None = None, extra=None, weight: float = 1.0, features=None):
    """One optimisation step of the student on a batch of paid images; returns the loss and its parts.

    ``grad_clip`` caps the global gradient norm (None: no cap). ``extra()`` adds a term that
    needs no paid answer (the unlabelled private images' consistency loss), with its parts.
    ``weight`` scales the loss that is differentiated (a rank's share of a data-parallel batch).
    ``features`` (a :class:`b2kd.distill.feature_match.FeatureMatch`) adds the gray-box term on the
    features of the method's own forward pass.
    """
    if features is not None:
        features.arm()
    loss, parts = method.loss(student, images, idx)
    if features is not None:
        more, more_parts = features.loss(idx)
        loss = loss + more
        parts = {**parts, **more_parts}
    if extra is not None:
        more, more_parts = extra()
        loss = loss + more
        parts = {**parts, **more_parts}
    optimizer.zero_grad(set_to_none=True)
    (loss if weight == 1.0 else loss * weight).backward()
    if grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]  # the projection too
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss, parts


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
    channels, size, _ = teacher.image_shape

    def new_student() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        return fast_layout(build_model(d.student, teacher.num_classes, channels, size).to(device))

    student = new_student()

    augment = Augment(crop_padding=d.crop_padding)

    fitted = []

    def fit(pool: torch.Tensor, answers: torch.Tensor, steps: int) -> None:
        """A short round of training on a partial pool (active methods retrain between queries)."""
        fitted.append(steps)
        method.prepare(answers, device)
        pool = pool.to(device)
        opt = make_optimizer(student, d.lr, d.momentum, d.weight_decay)
        rng = torch.Generator().manual_seed(cfg.seed + len(pool))
        student.train()
        for _ in range(steps):
            idx = torch.randint(len(pool), (min(d.batch_size, len(pool)),), generator=rng).to(device)
            train_step(method, student, opt, augment(pool[idx], generator=rng), idx, d.grad_clip)

    if method.source == "local" and private is None:
        raise ValueError(f"method '{d.method}' queries local images, but none were given")
    acq = Acquisition(
        teacher=teacher, budget=d.budget, seed=cfg.seed, device=device, out=out, student=student,
        fit=fit, generator=generator, private=private, query_batch=d.query_batch, on_paid=on_paid,
        local_model=local_model if method.white_box else None,
        setup=setup if method.source == "generator" else None,
        discriminator=discriminator, anchors_from=unlabelled if method.source == "generator" else None,
    )
    # gray-box answers (+embedding kinds): the teacher's embeddings of the pool, read from the ledger
    with_features = teacher.kind.embedding and d.feature_weight > 0

    def acquire() -> tuple[torch.Tensor, ...]:
        images, responses = method.acquire(acq)
        return (images, responses, teacher.embeddings(images)) if with_features else (images, responses)

    # under torchrun rank 0 alone pays, and every rank receives the pool (b2kd.core.distributed)
    images, responses, *embeddings = distributed.from_rank0(acquire)
    if fitted:
        student = new_student()  # the final student starts from the same weights whatever came before
    teacher_top1 = top1(responses)
    train_idx, val_idx = split_pool(len(images), d.val_fraction, cfg.seed)
    method.prepare(responses, device)
    images = images.to(device)
    teacher_top1 = teacher_top1.to(device)

    trainee = distributed.wrap(student, device, cfg.distributed.sync_batchnorm)  # DDP under torchrun
    batch = d.batch_size * distributed.world_size()  # the effective batch: per rank x world size
    optimizer = make_optimizer(student, distributed.scaled_lr(d.lr, cfg.distributed.scale_lr), d.momentum,
                               d.weight_decay)
    features = None
    if with_features:
        from b2kd.distill.feature_match import FeatureMatch

        features = FeatureMatch(student, embeddings[0], d.feature_weight, device, cfg.seed)
        optimizer.add_param_group({"params": list(features.proj.parameters())})  # same lr and schedule
    steps_per_epoch = math.ceil(len(train_idx) / batch)
    # distill.steps fixes the training length whatever the pool's size (budget sweeps compare
    # methods at equal compute); the schedule then spans ceil(steps / steps per epoch) epochs
    total_steps = d.steps if d.steps is not None else d.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    # stepped after every optimisation step, so the schedule ends with training (milestones are
    # given in epochs, as in the reference recipe)
    scheduler = make_step_scheduler(optimizer, d.schedule, total_steps, min(d.warmup_steps, total_steps),
                                    tuple(m * steps_per_epoch for m in d.milestones))
    if d.max_steps is not None:
        total_steps = min(total_steps, d.max_steps)
        epochs = math.ceil(total_steps / steps_per_epoch)
    select = d.select if len(val_idx) else "last"
    meta = {"role": "student", "method": d.method, "response": str(teacher.kind), "arch": d.student}
    extras = {"feature_projection": features.proj} if features is not None else {}
    local = None
    if d.local_unlabelled:
        if unlabelled is None:
            raise ValueError("distill.local_unlabelled is set, but no private images were given")
        local = LocalUnlabelled(unlabelled, max(1, round(d.batch_size * d.unlabelled_ratio)),
                                d.unlabelled_threshold, d.unlabelled_weight, augment, StrongAugment(), device)
    terms = device_terms(d, student, unlabelled, acq.anchor_targets, augment, device)
    if local is not None:
        terms.append(lambda rng: local.loss(student, rng))
    engine = Engine(out, student, optimizer, scheduler, epochs, cfg.seed, select=select, meta=meta,
                    schedule_per="step", writes=distributed.is_main(), extras=extras)
    if engine.resume(distributed.checkpoint_from_rank0(engine.latest_path)):
        log(f"resuming distillation at epoch {engine.start_epoch + 1}/{epochs}")
    timing = {"images": 0, "seconds": 0.0}

    def train_epoch(epoch: int, rng: torch.Generator) -> dict:
        order = train_idx[torch.randperm(len(train_idx), generator=rng)]
        totals: dict[str, float] = {}
        steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        start = time.perf_counter()
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch].to(device)
            extra = combined(terms, rng)
            # every rank augments the whole batch (the same draws as one process) and trains on its part
            idx, x, weight = distributed.my_part(idx, augment(images[idx], generator=rng))
            loss, parts = train_step(method, trainee, optimizer, x, idx, d.grad_clip, extra, weight, features)
            scheduler.step()
            for key, value in {"loss": loss.item(), **parts}.items():
                totals[key] = totals.get(key, 0.0) + value
        seconds = time.perf_counter() - start
        n_images = min(steps * batch, len(order))
        timing["images"] += n_images
        timing["seconds"] += seconds
        return distributed.mean_over_ranks(
            {**{k: v / max(steps, 1) for k, v in totals.items()}, "img_per_s": n_images / seconds})

    @torch.no_grad()
    def validate() -> float:
        agree = 0
        for i in range(0, len(val_idx), 1000):
            idx = val_idx[i : i + 1000].to(device)
            agree += int((student(images[idx]).argmax(1) == teacher_top1[idx]).sum())
        return agree / len(val_idx)

    def report_epoch(r: dict) -> None:
        val = f" val-agree {r['val']:.4f}" if "val" in r else ""
        log(f"{d.method}/{teacher.kind} epoch {r['epoch'] + 1}/{epochs}: loss {r['loss']:.4f}"
            f"{val} {r['img_per_s']:.0f} img/s ({r['seconds']:.0f}s)")

    summary = engine.run(train_epoch, validate if len(val_idx) else None, report_epoch)
    if distributed.is_main() and len(val_idx):  # what the report's synthetic-vs-real table reads
        atomic_save({"kind": "val_slice", "images": images[val_idx].cpu(),
                     "teacher_top1": teacher_top1[val_idx].cpu()}, out / VAL_SLICE)
    totals = teacher.ledger.totals()
    return {
        **summary,
        "queries": totals["queries"],
        "bytes_sent": totals["bytes_sent"],
        "bytes_received": totals["bytes_received"],
        "pool_size": len(images),
        "setup_in_pool": 0 if acq.setup is None else len(acq.setup[0]),
        "embedding_dim": int(embeddings[0].shape[1]) if with_features else None,
        "with_embedding": int((~torch.isnan(embeddings[0]).any(1)).sum()) if with_features else 0,
        "val_size": len(val_idx),
        "train_img_per_s": timing["images"] / timing["seconds"] if timing["seconds"] else None,
        "select": select,
    }
