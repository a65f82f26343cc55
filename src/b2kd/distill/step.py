"""One optimisation step of the student, and the loss terms beside the paid answers' own.

The method's loss on a batch of paid images, plus what needs no paid answer: the gray-box
feature term (:class:`b2kd.distill.feature_match.FeatureMatch`) and the terms that read the
private images on the device (the semi-supervised term).
"""

from __future__ import annotations

import torch


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
