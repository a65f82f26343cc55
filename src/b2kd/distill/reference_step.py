"""The reference code's MEKD training step, rebuilt from its equations, for comparison only.

Each step the reference generates a fresh batch with G, queries the teacher on
it, runs G on the teacher's output (without gradients) and on the student's
output, and back-propagates into G's parameters although G is never updated.

The loss here is written out with plain torch operations from the equations of
spec section 3 (the reference code's, with b2kd's stated corrections: centred
log-probabilities, tau^2 and log_softmax); it calls none of b2kd's loss or
response code. So ``tests/test_reference_step.py``, which checks that b2kd's
own step (``b2kd.distill.methods.mekd``: paid pool, cached G(t / tau_g), frozen G)
gives the same loss and student gradients, checks b2kd's formulas and not only
its caching. ``benchmarks/distill_throughput.py`` times the two steps.
"""

from __future__ import annotations

import torch

from b2kd.blackbox import ResponseKind
from b2kd.blackbox.responses import PROB_FLOOR
from b2kd.models import to_unit


def _teacher_targets(probs: torch.Tensor, hard: bool) -> torch.Tensor:
    """Centred teacher logits from full probabilities: soft answers give log p (p clamped away
    from 0) minus its row mean; hard answers give the one-hot of the top class minus 1/K."""
    num_classes = probs.shape[1]
    if hard:
        one_hot = torch.zeros_like(probs)
        one_hot[torch.arange(len(probs)), probs.argmax(1)] = 1.0
        return one_hot - 1.0 / num_classes
    log_p = torch.log(torch.clamp(probs, min=PROB_FLOOR))
    return log_p - log_p.mean(dim=1, keepdim=True)


def reference_terms(
    student: torch.nn.Module,
    generator: torch.nn.Module,
    teacher: torch.nn.Module,
    images: torch.Tensor,
    kind: ResponseKind,
    tau_g: float = 5.0,
    tau: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms: |G(s / tau_g) - G(t / tau_g)|_1 (mean over pixels) and
    tau^2 * KL(softmax(t / tau) || softmax(s / tau)) (mean over the batch).

    ``t`` comes from the teacher queried on ``images`` now, ``s`` is the student's
    output centred; G(t / tau_g) is recomputed under no-grad, as the reference does,
    while G's parameters stay live (the reference never freezes G). Soft and hard
    answers only: the reference has no other response kinds.
    """
    kind = ResponseKind.parse(kind)
    if kind.name not in ("soft", "hard"):
        raise ValueError(f"the reference step knows soft and hard answers, not '{kind}'")
    generator.requires_grad_(True)
    with torch.no_grad():
        t = _teacher_targets(torch.softmax(teacher(images), dim=1), kind.is_hard)
        t_images = generator(t / tau_g)
    s = student(images)
    s = s - s.mean(dim=1, keepdim=True)
    align = torch.abs(generator(s / tau_g) - t_images).mean()
    log_p_t = torch.log_softmax(t / tau, dim=1)
    log_p_s = torch.log_softmax(s / tau, dim=1)
    kl = (torch.exp(log_p_t) * (log_p_t - log_p_s)).sum(dim=1).mean()
    return align, tau * tau * kl


def reference_loss(
    student: torch.nn.Module,
    generator: torch.nn.Module,
    teacher: torch.nn.Module,
    images: torch.Tensor,
    kind: ResponseKind,
    tau_g: float = 5.0,
    tau: float = 5.0,
    beta: float = 1.0,
) -> torch.Tensor:
    """The reference's loss on ``images``: alignment + beta * tau^2 KL (:func:`reference_terms`)."""
    align, match = reference_terms(student, generator, teacher, images, kind, tau_g, tau)
    return align + beta * match


def reference_step(
    student: torch.nn.Module,
    generator: torch.nn.Module,
    teacher: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    kind: ResponseKind,
) -> float:
    """One training step of the reference: fresh z, fresh query, three generator passes."""
    z = torch.randn(batch_size, generator.config["latent_dim"], device=next(generator.parameters()).device)
    images = to_unit(generator(z))  # float images, still attached to G's graph as in the reference
    loss = reference_loss(student, generator, teacher, images, kind)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()
