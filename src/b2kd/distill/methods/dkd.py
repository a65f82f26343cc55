"""DKD, decoupled knowledge distillation (Zhao et al., CVPR 2022) on the edge's local images.

A random transfer set drawn from the private images is queried once (within
the budget). The KD loss is split into a target-class term (TCKD) and a
non-target-class term (NCKD), weighted ``distill.dkd_alpha`` and
``distill.dkd_beta`` at ``distill.tau``. The target class is the teacher's
top-1: the edge has no ground-truth labels.
"""

from __future__ import annotations

from b2kd.distill.losses import dkd_loss
from b2kd.distill.methods.base import Method


class DKD(Method):
    name = "dkd"
    source = "local"
    needs_soft = True

    def loss(self, student, images, idx):
        """alpha * TCKD + beta * NCKD, target = the teacher's top-1."""
        c = self.cfg
        return dkd_loss(student(images), self.t_logits[idx], c.tau, c.dkd_alpha, c.dkd_beta)
