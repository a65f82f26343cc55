"""Mixup among paid generator images, paid where the student is least sure.

Active Mixup (Wang et al., CVPR 2020) pays for convex combinations of images chosen where the
student is least sure; it mixes private images. Here only generator images already in the pool
are mixed, on the device: ``lam * a + (1 - lam) * b`` for random pairs and ``lam`` in
[0.3, 0.7], quantised to uint8. A student fitted on the pool so far scores the free candidates,
and the budget's ``share`` is spent on the ones with the lowest top probability. No private
image is involved, so nothing sent can copy one.
"""

from __future__ import annotations

import torch

from b2kd.pool.paid import load_or_draw, pay


def mixtures(images: torch.Tensor, n: int, rng: torch.Generator) -> torch.Tensor:
    """``n`` uint8 mixtures of random pairs of uint8 ``images``."""
    a = torch.randint(len(images), (n,), generator=rng)
    b = torch.randint(len(images), (n,), generator=rng)
    lam = 0.3 + 0.4 * torch.rand(n, 1, 1, 1, generator=rng)
    mixed = lam * images[a].float() + (1 - lam) * images[b].float()
    return mixed.round().clamp(0, 255).to(torch.uint8)


def least_sure(probs: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` rows with the lowest top probability."""
    return probs.max(1).values.argsort()[:n]


def mixup_pool(acq, images: torch.Tensor, responses: torch.Tensor, n: int, candidates_per_query: int,
               fit_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pay for ``n`` mixtures of the pool's images where a student fitted on the pool is least sure."""
    from b2kd.pool.balanced import score_probs

    def draw() -> torch.Tensor:
        acq.fit(images, responses, fit_steps)
        rng = torch.Generator().manual_seed(acq.seed + 7727)
        cands = mixtures(images, n * candidates_per_query, rng)
        return cands[least_sure(score_probs(acq.student, cands, acq.device), n)]

    chosen = load_or_draw(acq.out / "pool-mixup.pt", n, acq.seed, "mixup", draw)
    return chosen, pay(acq.teacher, chosen, acq.query_batch, acq.on_paid)
