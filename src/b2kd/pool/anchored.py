"""Queries anchored on the private distribution, without sending it.

On the device, each of a sample of private images is inverted into the generator's latent
space (``z*`` minimising the pixel distance between G(z) and the image). The pool then pays
for generator images at perturbed latents ``z* + sd * eps`` around those anchors: images
of the kinds the device holds, in the proportions it holds them, that are still the
generator's, never a private image. ``sd`` is the knob that trades privacy distance for
accuracy, and a floor is enforced before anything is paid: a candidate closer (L2 in
[0, 1] pixel space, the audit's measure) to any private image than the floor is dropped.
The floor is a quantile of the private set's own leave-one-out nearest-neighbour distances,
so it means "no closer to a private image than most private images are to each other".

Each anchor's neighbours' answers, averaged, are also a label for the private image itself
(a soft vote of the teacher over images around it): :class:`AnchorLabels` trains the student
on the real images with those labels, on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2kd.models import from_uint8
from b2kd.pool.paid import render


def invert(generator: torch.nn.Module, images: torch.Tensor, steps: int, seed: int,
           lr: float = 0.1, batch_size: int = 1000) -> torch.Tensor:
    """Latents whose G(z) is nearest each uint8 image in pixels (Adam from a seeded N(0, I)).

    A small pull towards the origin (the prior's log-density) keeps z where G was trained.
    """
    device = next(generator.parameters()).device
    generator.eval()
    rng = torch.Generator().manual_seed(seed + 104729)
    out = []
    for start in range(0, len(images), batch_size):
        target = from_uint8(images[start : start + batch_size]).to(device)
        z = torch.randn(len(target), generator.config["latent_dim"], generator=rng).to(device)
        z.requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            with torch.enable_grad():
                loss = (generator(z) - target).square().flatten(1).mean(1).sum() + 1e-3 * z.square().sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
        out.append(z.detach().cpu())
    return torch.cat(out) if out else torch.empty(0, generator.config["latent_dim"])


def nearest_l2(queries: torch.Tensor, refs: torch.Tensor, chunk: int = 1024,
               exclude_self: bool = False) -> torch.Tensor:
    """L2 distance (pixels in [0, 1]) from each uint8 query to its nearest uint8 ref; with
    ``exclude_self`` the queries are the refs and each image's distance to itself is skipped."""
    r = refs.flatten(1).float() / 255
    r_sq = (r * r).sum(1)
    out = []
    for start in range(0, len(queries), chunk):
        q = queries[start : start + chunk].flatten(1).float() / 255
        d2 = ((q * q).sum(1, keepdim=True) + r_sq - 2 * q @ r.T).clamp_min(0)
        if exclude_self:
            rows = torch.arange(len(q))
            d2[rows, rows + start] = float("inf")
        top = d2.topk(min(4, len(r)), dim=1, largest=False).indices  # the matmul form loses digits near 0
        exact = (q[:, None] - r[top]).square().sum(-1)
        if exclude_self:
            exact[top == (torch.arange(len(q)) + start)[:, None]] = float("inf")
        out.append(exact.min(1).values.sqrt())
    return torch.cat(out)


def privacy_floor(private: torch.Tensor, quantile: float, sample: int = 2000, seed: int = 0) -> float:
    """The ``quantile`` of the private images' leave-one-out nearest-neighbour L2 distances."""
    rng = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(private), generator=rng)[:sample]
    sub = private[pick]
    return float(torch.quantile(nearest_l2(sub, sub, exclude_self=True), quantile))


def anchored_images(generator: torch.nn.Module, private: torch.Tensor, n: int, per_anchor: int,
                    sd: float, floor: float, seed: int, steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 generator images around inverted private images, none nearer a private
    image than ``floor``; returns (images, the private index of each image's anchor).

    Candidates under the floor are replaced by fresh draws around the same anchors (up to
    ten rounds; anchors that never clear it are left short, so fewer than ``n`` may come back).
    """
    rng = torch.Generator().manual_seed(seed + 15485863)
    n_anchors = min(len(private), -(-n // per_anchor))
    anchors = torch.randperm(len(private), generator=rng)[:n_anchors]
    z_star = invert(generator, private[anchors], steps, seed)
    owner = torch.arange(n_anchors).repeat_interleave(per_anchor)[:n]
    kept_img, kept_owner = [], []
    for _ in range(10):
        if len(owner) == 0:
            break
        z = z_star[owner] + sd * torch.randn(len(owner), z_star.shape[1], generator=rng)
        images = render(generator, z)
        ok = nearest_l2(images, private) >= floor
        kept_img.append(images[ok])
        kept_owner.append(owner[ok])
        owner = owner[~ok]
    images, owner = torch.cat(kept_img), torch.cat(kept_owner)
    return images, anchors[owner]


def anchor_targets(anchor_idx: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(private indices, the mean answer of each one's paid neighbours as a distribution)."""
    unique, inverse = torch.unique(anchor_idx, return_inverse=True)
    sums = torch.zeros(len(unique), probs.shape[1]).index_add_(0, inverse, probs.float())
    counts = torch.bincount(inverse, minlength=len(unique)).clamp_min(1)
    return unique, sums / counts[:, None]


class AnchorLabels:
    """The student learns each anchored private image's transferred label, on the device."""

    def __init__(self, private: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor, batch_size: int,
                 weight: float, augment, device: torch.device):
        self.images = private[idx]
        self.targets = targets
        self.batch_size = min(batch_size, len(idx))
        self.weight = weight
        self.augment = augment
        self.device = device

    def loss(self, student: torch.nn.Module, rng: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        pick = torch.randint(len(self.images), (self.batch_size,), generator=rng)
        logits = student(self.augment(self.images[pick], generator=rng).to(self.device))
        target = self.targets[pick].to(self.device)
        loss = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
        return self.weight * loss, {"anchor": float(loss.detach())}
