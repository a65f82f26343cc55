"""Every loss a student trains with, in its standard form (spec sections 2 and 3); the GAN's
are :mod:`b2kd.deprivatize.losses` (AL's adversarial terms reuse them).

Kept free of models and data so that each can be checked against numbers
computed by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2kd.blackbox.responses import centre
from b2kd.deprivatize.losses import gan_discriminator_loss, gan_generator_loss


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * KL(softmax(t/tau) || softmax(s/tau)), averaged over the batch.

    Uses log_softmax on both sides and the tau^2 factor (the reference multiplies
    by tau and takes log of softmax).
    """
    log_p_t = F.log_softmax(teacher_logits / tau, dim=1)
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    return tau * tau * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def generator_alignment(
    generator: torch.nn.Module,
    student_logits: torch.Tensor,
    teacher_images: torch.Tensor,
    tau_g: float,
    distance: str = "l1",
) -> torch.Tensor:
    """|| G(centre(s) / tau_g) - G(t / tau_g) ||, mean over pixels.

    ``teacher_images`` is G(t / tau_g), computed once per paid image and cached;
    only the student side runs through the frozen generator here.
    """
    student_images = generator(centre(student_logits) / tau_g)
    if distance == "l1":
        return F.l1_loss(student_images, teacher_images)
    if distance == "l2":
        return F.mse_loss(student_images, teacher_images)
    raise ValueError(f"unknown distance '{distance}'; use l1 or l2")


def label_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the teacher's top-1 label (hard answers)."""
    return F.cross_entropy(logits, teacher_logits.argmax(1))


def mekd_loss(
    generator: torch.nn.Module,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_images: torch.Tensor,
    tau_g: float = 5.0,
    tau: float = 5.0,
    beta: float = 1.0,
    distance: str = "l1",
    hard_ce: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MEKD: generator alignment + beta * (tau^2 KL, or cross-entropy on the hard label).

    Returns the total and its named parts for logging.
    """
    align = generator_alignment(generator, student_logits, teacher_images, tau_g, distance)
    if hard_ce:
        match = label_cross_entropy(student_logits, teacher_logits)
    else:
        match = kd_kl(centre(student_logits), teacher_logits, tau)
    total = align + beta * match
    return total, {"align": float(align.detach()), "match": float(match.detach())}


# --- baselines (spec section 4) --------------------------------------------------------------


def logit_matching(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """ML: mean squared error between the student's logits and the centred teacher log-probs.

    The teacher side is centred here (log-probs minus their per-row mean), so a
    constant added to a teacher row changes nothing; the student side is raw.
    """
    return F.mse_loss(student_logits, centre(teacher_log_probs))


def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled KD's two terms (Zhao et al., CVPR 2022), each tau^2-scaled and batch-averaged.

    The target class is the teacher's top-1 (the edge has no ground truth).
    TCKD: KL(teacher || student) of the binary [p_target, 1 - p_target] at tau.
    NCKD: KL(teacher || student) of the softmax at tau over the non-target
    classes only (the target logit is pushed down by 1000 before the softmax).
    """
    target = teacher_logits.argmax(1, keepdim=True)
    mask = torch.zeros_like(teacher_logits, dtype=torch.bool).scatter_(1, target, True)

    def binary_log_probs(logits: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits / tau, dim=1)
        log_target = log_p.gather(1, target)
        log_rest = torch.logsumexp(log_p.masked_fill(mask, float("-inf")), dim=1, keepdim=True)
        return torch.cat([log_target, log_rest], dim=1)

    def non_target_log_probs(logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits / tau - 1000.0 * mask.to(logits.dtype), dim=1)

    tckd = F.kl_div(binary_log_probs(student_logits), binary_log_probs(teacher_logits),
                    reduction="batchmean", log_target=True)
    nckd = F.kl_div(non_target_log_probs(student_logits), non_target_log_probs(teacher_logits),
                    reduction="batchmean", log_target=True)
    return tau * tau * tckd, tau * tau * nckd


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tau: float = 5.0,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DKD: alpha * TCKD + beta * NCKD (see ``dkd_terms``); returns the total and its parts."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, tau)
    total = alpha * tckd + beta * nckd
    return total, {"tckd": float(tckd.detach()), "nckd": float(nckd.detach())}


def al_discriminator_loss(
    discriminator: torch.nn.Module, teacher_logits: torch.Tensor, student_logits: torch.Tensor
) -> torch.Tensor:
    """AL's discriminator loss on detached logit vectors: teacher -> 1, student -> 0.

    The mean of the two BCE-with-logits terms, as ``gan_discriminator_loss``.
    """
    real = discriminator(teacher_logits.detach())
    fake = discriminator(student_logits.detach())
    return gan_discriminator_loss(real, fake)


def al_student_adversarial(
    discriminator: torch.nn.Module, student_logits: torch.Tensor
) -> torch.Tensor:
    """AL's non-saturating adversarial term for the student: BCE(D(student logits), 1)."""
    return gan_generator_loss(discriminator(student_logits))
