"""The reference code's MEKD training step, rebuilt from its description, for comparison only.

Each step the reference generates a fresh batch with G, queries the teacher on
it, runs G on the teacher's output and on the student's output, and
back-propagates into G's parameters although G is never updated. b2kd's own
step (``b2kd.methods.mekd``) computes the same loss from a paid pool and cached
G(t / tau_g). ``benchmarks/distill_throughput.py`` times the two and
``tests/test_reference_step.py`` proves they compute the same loss and student
gradients.
"""

from __future__ import annotations

import torch

from b2kd.blackbox import ResponseKind, teacher_logits
from b2kd.losses import mekd_loss
from b2kd.models import to_unit


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
    """Loss on ``images`` with the teacher queried and G(t / tau_g) recomputed, G's parameters live."""
    generator.requires_grad_(True)  # the reference never freezes G
    with torch.no_grad():
        api = kind.apply(torch.softmax(teacher(images), dim=1))
    t = teacher_logits(api, kind)
    t_images = generator(t / tau_g)  # recomputed every step (and part of the graph)
    loss, _ = mekd_loss(generator, student(images), t, t_images, tau_g=tau_g, tau=tau, beta=beta,
                        hard_ce=False)
    return loss


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
