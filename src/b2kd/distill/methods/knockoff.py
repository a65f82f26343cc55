"""KN, Knockoff Nets (Orekondy et al., CVPR 2019), random strategy: the baseline that sends local images.

A random transfer set drawn from the edge's private images is queried once
(within the budget) and the student is trained on the stored responses as they
are (temperature 1). It needs no generator, and every image it pays for is a private
image sent as it is: ``b2kd audit`` shows exactly that contrast with MEKD.
"""

from __future__ import annotations

from b2kd.distill.methods.base import Method


class Knockoff(Method):
    name = "kn"
    source = "local"
    needs_soft = False

    def loss(self, student, images, idx):
        """Cross-entropy with the teacher's probabilities as they are (KL at temperature 1, as
        Knockoff trains); cross-entropy on the label for hard answers with hard_loss=ce.

        Not softened at ``distill.tau``: that would make it the KD baseline on the same pool.
        """
        return self.match(student(images), idx, tau=1.0)
