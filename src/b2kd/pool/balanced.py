"""A pool that covers the teacher's classes: score free generator candidates, pay for a balanced set.

Candidates from the generator cost nothing; answers do. A first part of the
budget (``distill.balance_first``) is paid for as plain generator samples. A
student fitted briefly on it labels a large set of fresh candidates on the
device; the rest of the budget is spent so that every class the teacher has
reaches an equal share of the pool (counting the first part's answers), and,
within each class, half of the picks go to the candidates the student is
least sure of (lowest top probability) and half are random.
With ``realism_drop``, each class first loses that share of its candidates,
those deprivatization's discriminator rates least like the private images
(:mod:`b2kd.pool.realism`).

A class the generator seldom draws (a private set with rare classes makes a
GAN that drops them) can lack candidates however many are scored. With
``neighbours`` (a standard deviation in latent space), each such class gets
extra candidates drawn around the latents of the first part's images that the
teacher put in it: G is smooth, so most neighbours of a paid 8 look like an 8.
They are still generator images, and the teacher's answer decides their label.

The choice is stored (``pool-balanced.pt``) before anything of it is paid, so
a resumed run re-reads the same images and the ledger answers what it already
paid for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from b2kd.blackbox import top1
from b2kd.pool.paid import latents, load_or_draw, load_or_synthesise, pay, render, synthesise
from b2kd.pool.realism import drop_least_real, realism


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


def shortfall(have: torch.Tensor, available: torch.Tensor, total: int) -> torch.Tensor:
    """Per class, how many candidates short of the even level ``(have.sum() + total) / K``."""
    level = -(-(int(have.sum()) + int(total)) // len(have))  # ceil
    return (level - have - available).clamp_min(0)


def neighbour_latents(parents: torch.Tensor, n: int, sigma: float, rng: torch.Generator) -> torch.Tensor:
    """``n`` latents ``parents[j] + sigma * eps``, each around a parent drawn uniformly."""
    picks = torch.randint(len(parents), (n,), generator=rng)
    return parents[picks] + sigma * torch.randn(n, parents.shape[1], generator=rng)


@torch.no_grad()
def score_probs(student: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 500):
    """The student's class probabilities on uint8 images, in eval mode."""
    student.eval()
    probs = [F.softmax(student(images[i : i + batch].to(device)).float(), dim=1).cpu()
             for i in range(0, len(images), batch)]
    student.train()
    return torch.cat(probs)


def score(student: torch.nn.Module, images: torch.Tensor, device: torch.device, batch: int = 500):
    """(predicted class, top probability) of the student on uint8 images, in eval mode."""
    conf, pred = score_probs(student, images, device, batch).max(1)
    return pred, conf


def pick(pred: torch.Tensor, conf: torch.Tensor, quotas: torch.Tensor, rng: torch.Generator,
         unsure_share: float = 0.5) -> torch.Tensor:
    """Indices of candidates meeting ``quotas``: per class, ``unsure_share`` of the quota (rounded
    up) the least confident, the rest at random (the pool takes half: measured on dev, all at random
    or all the least sure lost on hard answers)."""
    chosen = []
    for k, q in enumerate(quotas.tolist()):
        if q == 0:
            continue
        n_unsure = min(q, math.ceil(q * unsure_share))
        members = (pred == k).nonzero().flatten()
        unsure = members[conf[members].argsort()][:n_unsure]
        rest = members[~torch.isin(members, unsure)]
        chosen += [unsure, rest[torch.randperm(len(rest), generator=rng)[: q - n_unsure]]]
    return torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long)


def with_neighbours(acq, cands, pred, conf, z_first, first_labels, short, sigma, per_query):
    """``(cands, pred, conf)`` with latent neighbours of the first part's images (latents
    ``z_first``, teacher labels ``first_labels``) added for each class ``short`` of candidates:
    ``short[k] * per_query`` of them per class, each counted for its parent's class, with the
    student's probability of that class as its confidence."""
    rng = torch.Generator().manual_seed(acq.seed + 29)
    for k in short.nonzero().flatten().tolist():
        parents = z_first[first_labels == k]
        if len(parents) == 0:  # the teacher named no first-part image k: nothing to grow from
            continue
        extra = render(acq.generator, neighbour_latents(parents, int(short[k]) * per_query, sigma, rng))
        probs = score_probs(acq.student, extra, acq.device)
        cands = torch.cat([cands, extra])
        pred = torch.cat([pred, torch.full((len(extra),), k, dtype=pred.dtype)])
        conf = torch.cat([conf, probs[:, k]])
    return cands, pred, conf


def balanced_pool(acq, first_fraction: float, candidates_per_query: int, fit_steps: int, num_classes: int,
                  neighbours: float = 0.0, realism_drop: float = 0.0):
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
        if realism_drop > 0:  # D's least real candidates of each class are never paid for
            keep = drop_least_real(pred, realism(acq.discriminator, cands), realism_drop)
            cands, pred, conf = cands[keep], pred[keep], conf[keep]
        first_labels = top1(first_answers)
        have = torch.bincount(first_labels, minlength=num_classes)
        available = torch.bincount(pred, minlength=num_classes)
        if neighbours > 0:
            z_first = latents(n_first, acq.generator.config["latent_dim"], acq.seed)
            cands, pred, conf = with_neighbours(acq, cands, pred, conf, z_first, first_labels,
                                                shortfall(have, available, n_rest), neighbours,
                                                candidates_per_query)
            available = torch.bincount(pred, minlength=num_classes)
        quotas = class_quotas(have, available, n_rest)
        idx = pick(pred, conf, quotas, torch.Generator().manual_seed(acq.seed + 17))
        if len(idx) < n_rest:  # too few distinct candidates per class: fill with the least sure
            spare = torch.ones(len(cands), dtype=torch.bool)
            spare[idx] = False
            rest = spare.nonzero().flatten()
            idx = torch.cat([idx, rest[conf[rest].argsort()][: n_rest - len(idx)]])
        return cands[idx]

    source = "balanced" if neighbours <= 0 else f"balanced-neighbours-{neighbours:g}"
    if realism_drop > 0:
        source += f"-realism-{realism_drop:g}"
    rest = load_or_draw(out / "pool-balanced.pt", n_rest, acq.seed, source, draw)
    rest_answers = pay(acq.teacher, rest, acq.query_batch, acq.on_paid)
    return torch.cat([first, rest]), torch.cat([first_answers, rest_answers])
