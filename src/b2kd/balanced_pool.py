"""A pool that covers the teacher's classes: score free generator candidates, pay for a balanced set.

Candidates from the generator cost nothing; answers do. A first part of the
budget (``distill.balance_first``) is paid for as plain generator samples. A
student fitted briefly on it labels a large set of fresh candidates on the
device; the rest of the budget is spent so that every class the teacher has
reaches an equal share of the pool (counting the first part's answers), and,
within each class, half of the picks go to the candidates the student is
least sure of (lowest top probability) and half are random.

The choice is stored (``pool-balanced.pt``) before anything of it is paid, so
a resumed run re-reads the same images and the ledger answers what it already
paid for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2kd.blackbox import top1
from b2kd.pool import load_or_draw, load_or_synthesise, pay, synthesise


def class_quotas(have: torch.Tensor, available: torch.Tensor, total: int) -> torch.Tensor:
    """How many new images to take per class so that ``have + take`` is as even as the
    ``available`` candidates allow, with ``take.sum() == min(total, available.sum())``.

    Water-filling: raise the lowest classes first; a class out of candidates drops out.
    """
    take = torch.zeros_like(have)
    left = min(int(total), int(available.sum()))
    while left > 0:
        open_ = (take < available).nonzero().flatten()
        level = have[open_] + take[open_]
        lowest = open_[level == level.min()]
        for k in lowest.tolist():
            if left == 0:
                break
            take[k] += 1
            left -= 1
    return take


@torch.no_grad()
def score(student: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 500):
    """(predicted class, top probability) of the student on uint8 images, in eval mode."""
    student.eval()
    preds, confs = [], []
    for start in range(0, len(images), batch):
        probs = F.softmax(student(images[start : start + batch].to(device)).float(), dim=1)
        conf, pred = probs.max(1)
        preds.append(pred.cpu())
        confs.append(conf.cpu())
    student.train()
    return torch.cat(preds), torch.cat(confs)


def pick(pred: torch.Tensor, conf: torch.Tensor, quotas: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Indices of candidates meeting ``quotas``: per class, half least confident, half random."""
    chosen = []
    for k, q in enumerate(quotas.tolist()):
        if q == 0:
            continue
        members = (pred == k).nonzero().flatten()
        unsure = members[conf[members].argsort()][: q - q // 2]
        rest = members[~torch.isin(members, unsure)]
        chosen += [unsure, rest[torch.randperm(len(rest), generator=rng)[: q // 2]]]
    return torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)


def balanced_pool(acq, first_fraction: float, candidates_per_query: int, fit_steps: int, num_classes: int):
    """Pay for a class-balanced generator pool of ``acq.budget`` images; returns (images, answers)."""
    out = acq.out
    n_first = max(1, min(acq.budget, round(acq.budget * first_fraction)))
    first = load_or_synthesise(acq.generator, n_first, acq.seed, out / "pool.pt")
    first_answers = pay(acq.teacher, first, acq.query_batch, acq.on_paid)
    n_rest = acq.budget - n_first
    if n_rest <= 0:
        return first, first_answers

    def draw() -> torch.Tensor:
        acq.fit(first, first_answers, fit_steps)
        # fresh candidates: another seed than the first part's, so none repeats an image paid for
        cands = synthesise(acq.generator, n_rest * candidates_per_query, acq.seed + 1_000_003)
        pred, conf = score(acq.student, cands, acq.device)
        have = torch.bincount(top1(first_answers), minlength=num_classes)
        available = torch.bincount(pred, minlength=num_classes)
        quotas = class_quotas(have, available, n_rest)
        idx = pick(pred, conf, quotas, torch.Generator().manual_seed(acq.seed + 17))
        if len(idx) < n_rest:  # too few distinct candidates per class: fill with the least sure
            spare = torch.ones(len(cands), dtype=torch.bool)
            spare[idx] = False
            rest = spare.nonzero().flatten()
            idx = torch.cat([idx, rest[conf[rest].argsort()][: n_rest - len(idx)]])
        return cands[idx]

    rest = load_or_draw(out / "pool-balanced.pt", n_rest, acq.seed, "balanced", draw)
    rest_answers = pay(acq.teacher, rest, acq.query_batch, acq.on_paid)
    return torch.cat([first, rest]), torch.cat([first_answers, rest_answers])
