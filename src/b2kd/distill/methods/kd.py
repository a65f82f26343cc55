"""KD, classic knowledge distillation (Hinton et al., 2015) on the edge's local images.

A random transfer set drawn from the private images is queried once (within
the budget) and the student matches the teacher's softened outputs with the
tau^2-scaled KL at ``distill.tau``. It needs soft responses: a hard label
carries no temperature to soften.
"""

from __future__ import annotations

from b2kd.distill.losses import kd_kl
from b2kd.distill.methods.base import Method


class KD(Method):
    name = "kd"
    source = "local"
    needs_soft = True

    def loss(self, student, images, idx):
        """tau^2 * KL(softmax(t/tau) || softmax(s/tau))."""
        loss = kd_kl(student(images), self.t_logits[idx], self.cfg.tau)
        return loss, {"kd": float(loss.detach())}
