"""Semi-supervised distillation: the edge's own images train the student, and never leave it.

A generator method's paid pool is the labelled anchor. The private images are
unlabelled data: each step the student labels a weakly augmented view of a
batch of them (shifted copies) and, where it is confident, learns to give the
same label to a strongly augmented view (FixMatch, Sohn et al., 2020). The
images are read on the device only; nothing here can reach the teacher, so the
ledger keeps holding generator images alone.

With ``distill.domain_mixup``, a second term mixes paid generator images with private
ones pixel-wise and trains the student on the same mix of the teacher's answer and its
own prediction (inter-domain mixup): examples between the two domains, at no query.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2kd.data.augment import Augment, StrongAugment, unit


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


class DomainMixup:
    """Inter-domain mixup: a paid generator image and a private image mixed pixel-wise, trained on the
    same mix of the teacher's answer and the student's own prediction on the private image (a bridge
    between the synthetic and the real domain; no query, the private images stay on the device)."""

    def __init__(self, private: torch.Tensor, images: torch.Tensor, targets: torch.Tensor,
                 train_idx: torch.Tensor, batch_size: int, weight: float, weak: Augment,
                 device: torch.device):
        self.private, self.images, self.targets = private, images, targets
        self.train_idx, self.batch_size, self.weight = train_idx, batch_size, weight
        self.weak, self.device = weak, device

    def loss(self, student: torch.nn.Module,
             rng: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        n = self.batch_size
        paid = self.train_idx[torch.randint(len(self.train_idx), (n,), generator=rng)].to(self.images.device)
        real = self.private[torch.randint(len(self.private), (n,), generator=rng)]
        x_paid = unit(self.weak(self.images[paid], generator=rng).to(self.device))
        x_real = unit(self.weak(real, generator=rng).to(self.device))
        with torch.no_grad():
            p_real = F.softmax(student(x_real), dim=1)
        lam = torch.rand(n, 1, generator=rng).to(self.device)
        x = lam.view(-1, 1, 1, 1) * x_paid + (1 - lam.view(-1, 1, 1, 1)) * x_real
        target = lam * self.targets[paid].to(self.device) + (1 - lam) * p_real
        loss = -(target * F.log_softmax(student(x), dim=1)).sum(1).mean()
        return self.weight * loss, {"domain_mixup": float(loss.detach())}
