"""ML, logit matching (Ba and Caruana, 2014) on the edge's local images.

A random transfer set drawn from the private images is queried once (within
the budget) and the student regresses the teacher's centred log-probs with a
mean squared error: an API gives probabilities, whose logs are the teacher's
logits up to a per-row constant, removed by centring.
"""

from __future__ import annotations

from b2kd.distill.losses import logit_matching
from b2kd.distill.methods.base import Method


class ML(Method):
    name = "ml"
    source = "local"
    needs_soft = True

    def loss(self, student, images, idx):
        """MSE(student logits, centred teacher log-probs)."""
        loss = logit_matching(student(images), self.t_logits[idx])
        return loss, {"mse": float(loss.detach())}
