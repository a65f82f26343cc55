"""KN, Knockoff Nets (Orekondy et al., CVPR 2019), random strategy: the baseline that sends local images.

A random transfer set drawn from the edge's private images is queried once
(within the budget) and the student is trained on the stored responses with
the KD loss. It needs no generator, and every image it pays for is a private
image sent as it is: ``b2kd audit`` shows exactly that contrast with MEKD.
"""

from __future__ import annotations

from b2kd.methods.base import Method


class Knockoff(Method):
    name = "kn"
    source = "local"
    needs_soft = False

    def loss(self, student, images, idx):
        """tau^2 KL at ``distill.tau``; cross-entropy on the label for hard answers with hard_loss=ce.

        The same choice as MEKD's matching term, so the two compare on equal terms.
        """
        return self.match(student(images), idx)
