"""Gray-box distillation: the student's penultimate features matched to the teacher's embedding.

A gray-box API answers each image with its probabilities and the teacher's penultimate-layer
embedding (``+embedding`` kinds). This term adds, to any method's loss on a batch of paid
images, ``weight x mean((P f_s - e_t / s)^2)``: ``f_s`` the student's penultimate features
(from the same forward pass the method makes, :class:`b2kd.models.penultimate.Penultimate`), ``P`` a
learned linear projection (student dim -> teacher dim, trained with the student, as in
FitNets, Romero et al., 2015), ``e_t`` the teacher's embedding and ``s`` the root mean square
of the pool's embeddings, so that the term starts near ``weight`` whatever the teacher's scale.
Images without an embedding (answers paid with another kind, such as deprivatization's reused
setup answers) add nothing.
"""

from __future__ import annotations

import torch
from torch import nn

from b2kd.models.penultimate import Penultimate


class FeatureMatch(nn.Module):
    def __init__(self, student: nn.Module, embeddings: torch.Tensor, weight: float, device: torch.device,
                 seed: int = 0):
        super().__init__()
        have = ~torch.isnan(embeddings).any(1)
        if not have.any():
            raise ValueError("feature matching needs the teacher's embeddings, and no paid image has one")
        self.weight = weight
        self.hook = Penultimate(student, first_only=True)
        torch.manual_seed(seed)
        self.proj = nn.Linear(self.hook.dim, embeddings.shape[1]).to(device)
        self.scale = float(embeddings[have].float().pow(2).mean().sqrt().clamp_min(1e-8))
        self.targets = (torch.nan_to_num(embeddings.float(), nan=0.0) / self.scale).to(device)
        self.have = have.to(device)

    def arm(self) -> None:
        """Call before the method's loss: the next forward pass of the student is the one matched."""
        self.hook.last = None
        self.hook.armed = True

    def loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The term for the pool indices ``idx`` of the batch the method's forward pass just saw."""
        features = self.hook.last
        if features is None or len(features) != len(idx):
            raise RuntimeError("feature matching needs the method's loss to run the student once on the"
                               f" batch of {len(idx)} paid images; it saw"
                               f" {'none' if features is None else len(features)}")
        mask = self.have[idx]
        if not mask.any():
            zero = self.proj.weight.sum() * 0.0
            return zero, {"feat": 0.0}
        diff = self.proj(features.flatten(1)[mask]) - self.targets[idx[mask]]
        term = self.weight * diff.pow(2).mean() * (mask.float().mean())  # absent rows count as zero
        return term, {"feat": float(term.detach())}

    def close(self) -> None:
        self.hook.close()
