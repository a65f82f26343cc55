"""AM, active mixup (Wang et al., CVPR 2020): query the mixups the student is least sure of.

A seeded random seed set of private images is queried first (``am_seed_fraction``
of the budget). Then, for ``am_cycles`` rounds, the student is fitted briefly on
everything paid so far, ``am_candidates`` mixups per query are drawn from
random pairs of private images, and the ones the student is least confident of
(lowest top probability) are queried. The reference scans all pairs with a
quadratic loop; here pairs and mixing weights are sampled in one go and scored
in batches. Soft or hard answers: the loss is Knockoff's.

Each round's choice is saved (``am-pool.pt``, atomically) before it is paid
for, with the student it was scored by, so a rerun continues where it stopped,
re-sends only what the ledger already answers (free) and never pays twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2kd.blackbox import BlackBoxError
from b2kd.core.checkpoint import atomic_save, read
from b2kd.distill.methods.base import Acquisition, Method
from b2kd.pool.paid import pay, sample_private


def mixup_pairs(n_private: int, m: int, generator: torch.Generator):
    """m random pairs (i, j), i != j if there are two images or more, and lambda ~ U(0, 1)."""
    i = torch.randint(n_private, (m,), generator=generator)
    j = (i + torch.randint(1, max(n_private, 2), (m,), generator=generator)) % n_private
    return i, j, torch.rand(m, generator=generator)


def mixup(
    private: torch.Tensor, i: torch.Tensor, j: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """round(lambda * x_i + (1 - lambda) * x_j) as uint8 (a convex combination stays in 0..255)."""
    lam = lam.view(-1, *[1] * (private.dim() - 1))
    mixed = lam * private[i].float() + (1 - lam) * private[j].float()
    return mixed.round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def least_confident(
    student: torch.nn.Module,
    private: torch.Tensor,
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    n: int,
    device: torch.device,
    batch: int = 500,
) -> torch.Tensor:
    """Indices of the n mixups (of ``pairs``) with the lowest top softmax probability.

    Scored in eval mode, in batches; the student is left in train mode.
    """
    i, j, lam = pairs
    student.eval()
    conf = []
    for start in range(0, len(i), batch):
        s = slice(start, start + batch)
        logits = student(mixup(private, i[s], j[s], lam[s]).to(device))
        conf.append(F.softmax(logits.float(), dim=1).amax(1).cpu())
    student.train()
    return torch.cat(conf).topk(n, largest=False).indices


def round_sizes(total: int, rounds: int) -> list[int]:
    """``total`` split as evenly as possible over ``rounds`` (earlier rounds take the remainder)."""
    return [total // rounds + (r < total % rounds) for r in range(rounds)]


class ActiveMixup(Method):
    name = "am"
    source = "local"
    needs_soft = False

    def acquire(self, acq: Acquisition) -> tuple[torch.Tensor, torch.Tensor]:
        """Seed set, then ``am_cycles`` rounds: fit, score mixups, query the least confident."""
        if acq.private is None or len(acq.private) == 0:
            raise BlackBoxError(f"method '{self.name}' mixes local images, but none were given")
        cfg, private = self.cfg, acq.private
        n_seed = min(round(acq.budget * cfg.am_seed_fraction), len(private))
        sizes = round_sizes(acq.budget - n_seed, cfg.am_cycles)
        path = acq.out / "am-pool.pt"
        key = {"seed": acq.seed, "budget": acq.budget, "n_seed": n_seed, "private": len(private),
               "cycles": cfg.am_cycles, "candidates": cfg.am_candidates,
               "fit_steps": cfg.am_fit_steps}
        state = read(path, "pool") if path.is_file() else None
        if state is None or state.get("key") != key:
            # "done": rounds finished (the seed set is round 0); "pending": chosen, not yet paid
            state = {"kind": "pool", "source": "am", "key": key, "done": 0, "student": None,
                     "images": private[:0], "responses": torch.empty(0, acq.teacher.num_classes),
                     "pending": sample_private(private, n_seed, acq.seed)}
            atomic_save(state, path)
        resumed_student = state["student"]
        while True:
            if state["pending"] is not None:
                pending = state["pending"]
                if len(pending):
                    answers = pay(acq.teacher, pending, acq.query_batch, acq.on_paid)
                    state["images"] = torch.cat([state["images"], pending])
                    state["responses"] = torch.cat([state["responses"], answers])
                state.update(done=state["done"] + 1, pending=None)
                atomic_save(state, path)
            cycle = state["done"] - 1
            if cycle >= cfg.am_cycles:
                return state["images"], state["responses"]
            n = sizes[cycle]
            if n > 0:
                if resumed_student is not None:  # the student of the last finished round, as it was
                    acq.student.load_state_dict(resumed_student)
                    resumed_student = None
                acq.fit(state["images"], state["responses"], cfg.am_fit_steps)
                rng = torch.Generator().manual_seed(acq.seed * 1009 + cycle + 1)
                pairs = mixup_pairs(len(private), cfg.am_candidates * n, rng)
                pick = least_confident(acq.student, private, pairs, n, acq.device, acq.query_batch)
                state["pending"] = mixup(private, *(p[pick] for p in pairs))
                weights = acq.student.state_dict()
                state["student"] = {k: v.detach().cpu().clone() for k, v in weights.items()}
            else:
                state["pending"] = private[:0]
            atomic_save(state, path)  # chosen before anything is sent

    def loss(self, student, images, idx):
        """As Knockoff: tau^2 KL at ``distill.tau``; for hard answers with hard_loss=ce,
        cross-entropy on the label."""
        return self.match(student(images), idx)
