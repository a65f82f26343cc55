"""The two steps of ``b2kd adapt``: a new head on frozen features, then the whole student.

1. **Head**: the body is frozen (eval mode); the shots' penultimate features are computed
   once and a linear head is fitted on them with Adam (``adapt.head_epochs`` passes).
2. **Fine-tuning** (``adapt.finetune_epochs`` passes over the private images, 0 to skip):
   body and both heads train (SGD, momentum 0.9, ``adapt.finetune_lr``) on the new head's
   cross-entropy on shifted copies of the shots plus ``adapt.keep_weight`` x tau^2
   KL(distilled student || old head) at ``adapt.tau`` on the private, unlabelled images,
   so the old task is kept without a single query. Shots and private images share each
   forward pass (one batch for BatchNorm).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from b2kd.core.config import AdaptConfig
from b2kd.data import Augment
from b2kd.distill.losses import kd_kl
from b2kd.models.heads import TwoHeads


@torch.no_grad()
def features(model: TwoHeads, images: torch.Tensor, device: torch.device,
             batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(images[i : i + batch_size].to(device))
                      for i in range(0, len(images), batch_size)])


def train_head(model: TwoHeads, images: torch.Tensor, labels: torch.Tensor, a: AdaptConfig,
               device: torch.device) -> dict:
    """Fit ``model.new_head`` on the frozen body's features of ``images``; returns loss and accuracy."""
    feats, labels = features(model, images, device), labels.to(device)
    optimizer = torch.optim.Adam(model.new_head.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(a.seed)
    for _ in range(a.head_epochs):
        perm = torch.randperm(len(feats), generator=gen).to(device)
        for i in range(0, len(perm), a.batch_size):
            idx = perm[i : i + a.batch_size]
            loss = F.cross_entropy(model.new_head(feats[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits = model.new_head(feats)
        return {"loss": float(F.cross_entropy(logits, labels)),
                "train_acc": float((logits.argmax(1) == labels).float().mean())}


def finetune(model: TwoHeads, original: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             private: torch.Tensor, a: AdaptConfig, crop_padding: int, device: torch.device) -> dict:
    """Train the whole student (see the module's docstring); returns steps and mean losses."""
    original.eval()
    # SGD, not Adam: Adam scales the tiny gradients of a near-zero KL up to full steps
    optimizer = torch.optim.SGD(model.parameters(), lr=a.finetune_lr, momentum=0.9)
    augment = Augment(crop_padding=crop_padding)
    gen = torch.Generator().manual_seed(a.seed + 1)
    steps_per_epoch = math.ceil(len(private) / a.batch_size)
    n_new = min(len(images), a.batch_size)
    totals = {"ce": 0.0, "keep": 0.0}
    model.train()
    for _ in range(a.finetune_epochs):
        perm = torch.randperm(len(private), generator=gen)
        for step in range(steps_per_epoch):
            pick = torch.randperm(len(images), generator=gen)[:n_new]
            new_x = augment(images[pick], generator=gen)
            old_x = augment(private[perm[step * a.batch_size : (step + 1) * a.batch_size]], generator=gen)
            old_logits, new_logits = model(torch.cat([new_x, old_x]).to(device))
            ce = F.cross_entropy(new_logits[:n_new], labels[pick].to(device))
            with torch.no_grad():
                target = original(old_x.to(device))
            keep = kd_kl(old_logits[n_new:], target, a.tau)
            loss = ce + a.keep_weight * keep
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals["ce"] += ce.item()
            totals["keep"] += keep.item()
    model.eval()
    steps = a.finetune_epochs * steps_per_epoch
    return {"epochs": a.finetune_epochs, "steps": steps, "private_images": len(private),
            "keep_weight": a.keep_weight, "tau": a.tau, "lr": a.finetune_lr,
            "mean_ce": totals["ce"] / max(steps, 1), "mean_keep_kl": totals["keep"] / max(steps, 1)}
