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


def consistency_loss(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float | torch.Tensor,
    sharpen: float | None = None,
) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the strong view on the weak view's confident top-1; returns the loss
    (mean over the whole batch, masked rows count as zero) and the share of rows kept.
    ``threshold`` is one number or one per class (indexed by the pseudo-label). With
    ``sharpen`` (a temperature below 1) the target is the weak view's distribution sharpened,
    softmax(weak / sharpen), instead of its top-1 (UDA, Xie et al., 2020)."""
    probs = F.softmax(weak_logits.detach(), dim=1)
    confidence, pseudo = probs.max(dim=1)
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(confidence.device)[pseudo]
    mask = (confidence >= threshold).float()
    target = pseudo if sharpen is None else F.softmax(weak_logits.detach() / sharpen, dim=1)
    loss = (F.cross_entropy(strong_logits, target, reduction="none") * mask).mean()
    return loss, float(mask.mean())


class ClassThresholds(torch.nn.Module):
    """Class-adaptive confidence thresholds (FlexMatch, Zhang et al., NeurIPS 2021).

    Each private image remembers the last class the student predicted for it with confidence
    at least ``threshold`` (-1 until then). A class's learning effect is the number of images
    remembered as it, over the largest of those counts and the number of images not yet
    learned (FlexMatch's warm-up); its threshold is ``threshold * b / (2 - b)`` for that effect
    ``b``. Classes the student has learned little of get a low threshold, so their pseudo-labels
    are used early; a class learned well keeps the fixed one. A module, so a checkpoint holds
    the memory and a resumed run goes on with it.
    """

    def __init__(self, n_images: int, n_classes: int, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.n_classes = n_classes
        self.register_buffer("learned", torch.full((n_images,), -1, dtype=torch.long))

    def thresholds(self) -> torch.Tensor:
        """One threshold per class, from what has been learned so far."""
        known = self.learned[self.learned >= 0]
        counts = torch.bincount(known, minlength=self.n_classes).float()
        unused = float(len(self.learned) - len(known))
        scale = max(float(counts.max()), unused)
        effect = counts / scale if scale > 0 else counts
        return self.threshold * effect / (2 - effect)

    def update(self, idx: torch.Tensor, weak_logits: torch.Tensor) -> None:
        """Remember the classes predicted at the fixed threshold for the images ``idx``."""
        confidence, pseudo = F.softmax(weak_logits.detach(), dim=1).max(dim=1)
        over = (confidence >= self.threshold).cpu()
        self.learned[idx[over]] = pseudo.cpu()[over]


class LocalUnlabelled:
    """Draws batches of private images and returns the consistency term of the student on them."""

    def __init__(self, private: torch.Tensor, batch_size: int, threshold: float, weight: float,
                 weak: Augment, strong: StrongAugment, device: torch.device,
                 adaptive: ClassThresholds | None = None, sharpen: float | None = None):
        if len(private) == 0:
            raise ValueError("distill.local_unlabelled needs private images, but the private set is empty")
        self.private = private
        self.batch_size = min(batch_size, len(private))
        self.threshold = threshold
        self.weight = weight
        self.weak = weak
        self.strong = strong
        self.device = device
        self.adaptive = adaptive
        self.sharpen = sharpen

    def loss(self, student: torch.nn.Module, rng: torch.Generator,
             labeller: torch.nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted consistency term and its parts; ``labeller`` (a weight average of the
        student, in eval mode) gives the pseudo-labels instead of the student itself."""
        idx = torch.randint(len(self.private), (self.batch_size,), generator=rng)
        batch = self.private[idx]
        with torch.no_grad():
            weak_logits = (student if labeller is None else labeller)(
                self.weak(batch, generator=rng).to(self.device))
        strong_logits = student(self.strong(batch, generator=rng).to(self.device))
        threshold: float | torch.Tensor = self.threshold
        if self.adaptive is not None:
            threshold = self.adaptive.thresholds()
            self.adaptive.update(idx, weak_logits)
        loss, kept = consistency_loss(weak_logits, strong_logits, threshold, self.sharpen)
        return self.weight * loss, {"unlabelled": float(loss.detach()), "confident": kept}
