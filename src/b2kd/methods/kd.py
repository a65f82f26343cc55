"""KD, classic knowledge distillation (Hinton et al., 2015) on the edge's local images.

A random transfer set drawn from the private images is queried once (within
the budget) and the student matches the teacher's softened outputs with the
tau^2-scaled KL at ``distill.tau``. It needs soft responses: a hard label
carries no temperature to soften.
"""

from __future__ import annotations

import torch

from b2kd.blackbox import teacher_logits
from b2kd.losses import kd_kl
from b2kd.methods.base import Method


class KD(Method):
    name = "kd"
    source = "local"
    needs_soft = True

    @torch.no_grad()
    def prepare(self, responses: torch.Tensor, device: torch.device) -> None:
        """Centred teacher logits (log-probs) of the paid transfer set."""
        self.t_logits = teacher_logits(responses, self.kind).to(device)

    def loss(self, student, images, idx):
        """tau^2 * KL(softmax(t/tau) || softmax(s/tau))."""
        loss = kd_kl(student(images), self.t_logits[idx], self.cfg.tau)
        return loss, {"kd": float(loss.detach())}
