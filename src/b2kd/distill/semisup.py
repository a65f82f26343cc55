"""Semi-supervised distillation: the edge's own images train the student, and never leave it.

A generator method's paid pool is the labelled anchor. The private images are
unlabelled data: each step the student labels a weakly augmented view of a
batch of them (shifted copies) and, where it is confident, learns to give the
same label to a strongly augmented view (FixMatch, Sohn et al., 2020). The
images are read on the device only; nothing here can reach the teacher, so the
ledger keeps holding generator images alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2kd.data.augment import Augment, StrongAugment


def consistency_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor,
                     threshold: float) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the strong view on the weak view's confident top-1; returns the loss
    (mean over the whole batch, masked rows count as zero) and the share of rows kept."""
    confidence, pseudo = F.softmax(weak_logits.detach(), dim=1).max(dim=1)
    mask = (confidence >= threshold).float()
    loss = (F.cross_entropy(strong_logits, pseudo, reduction="none") * mask).mean()
    return loss, float(mask.mean())


class LocalUnlabelled:
    """Draws batches of private images and returns the consistency term of the student on them."""

    def __init__(self, private: torch.Tensor, batch_size: int, threshold: float, weight: float,
                 weak: Augment, strong: StrongAugment, device: torch.device):
        if len(private) == 0:
            raise ValueError("distill.local_unlabelled needs private images, but the private set is empty")
        self.private = private
        self.batch_size = min(batch_size, len(private))
        self.threshold = threshold
        self.weight = weight
        self.weak = weak
        self.strong = strong
        self.device = device

    def loss(self, student: torch.nn.Module,
             rng: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted consistency term and its parts."""
        idx = torch.randint(len(self.private), (self.batch_size,), generator=rng)
        batch = self.private[idx]
        with torch.no_grad():
            weak_logits = student(self.weak(batch, generator=rng).to(self.device))
        strong_logits = student(self.strong(batch, generator=rng).to(self.device))
        loss, kept = consistency_loss(weak_logits, strong_logits, self.threshold)
        return self.weight * loss, {"unlabelled": float(loss.detach()), "confident": kept}
