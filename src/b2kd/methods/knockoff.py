"""KN, Knockoff Nets (Orekondy et al., CVPR 2019), random strategy: the baseline that sends local images.

A random transfer set drawn from the edge's private images is queried once
(within the budget) and the student is trained on the stored responses with
the KD loss. It needs no generator, and every image it pays for is a private
image sent as it is: ``b2kd audit`` shows exactly that contrast with MEKD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from b2kd.blackbox import teacher_logits
from b2kd.losses import kd_kl
from b2kd.methods.base import Method


class Knockoff(Method):
    name = "kn"
    source = "local"
    needs_soft = False

    @torch.no_grad()
    def prepare(self, responses: torch.Tensor, device: torch.device) -> None:
        """Centred teacher logits of the paid transfer set (one-hot minus 1/K for hard answers)."""
        self.t_logits = teacher_logits(responses, self.kind).to(device)

    def loss(self, student, images, idx):
        """tau^2 KL at ``distill.tau``; cross-entropy on the label for hard answers with hard_loss=ce.

        The same choice as MEKD's matching term, so the two compare on equal terms.
        """
        logits = student(images)
        if self.kind.is_hard and self.cfg.hard_loss == "ce":
            loss = F.cross_entropy(logits, self.t_logits[idx].argmax(1))
        else:
            loss = kd_kl(logits, self.t_logits[idx], self.cfg.tau)
        return loss, {"match": float(loss.detach())}
