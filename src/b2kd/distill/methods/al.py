"""AL, adversarial logit learning on the edge's local images.

A random transfer set drawn from the private images is queried once (within
the budget). The student is trained with KD plus an adversarial term: a small
MLP discriminator on logit vectors learns to tell the teacher's logits from
the student's, and the student learns to fool it. A real min-max: every
batch first takes one Adam step of the discriminator (teacher -> 1,
student -> 0), then the student minimises KD + ``distill.al_weight`` *
BCE(D(student), 1). (The reference let both sides minimise the same loss.)

The student's logits are centred before they reach the discriminator: the
teacher's logits come from probabilities and are centred, so an offset
alone would give the student away. The discriminator is not checkpointed; a
resumed run starts it afresh.
"""

from __future__ import annotations

import torch
from torch import nn

from b2kd.blackbox.responses import centre
from b2kd.distill.losses import al_discriminator_loss, al_student_adversarial, kd_kl
from b2kd.distill.methods.base import Method


def logit_discriminator(num_classes: int, hidden: int = 64) -> nn.Module:
    """K -> 64 -> 1 MLP with a LeakyReLU: one real/fake logit per logit vector."""
    return nn.Sequential(nn.Linear(num_classes, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))


class AL(Method):
    name = "al"
    source = "local"
    needs_soft = True
    data_parallel = False  # its logit discriminator is trained per process (b2kd.core.distributed)

    @torch.no_grad()
    def prepare(self, responses: torch.Tensor, device: torch.device) -> None:
        """Centred teacher logits of the paid pool; a fresh discriminator and its Adam."""
        super().prepare(responses, device)
        self.discriminator = logit_discriminator(self.t_logits.shape[1]).to(device)
        self.d_optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=self.cfg.al_lr, betas=(0.5, 0.999)
        )

    def discriminator_step(self, t_logits: torch.Tensor, s_logits: torch.Tensor) -> float:
        """One Adam step of the discriminator on detached logits; returns its loss."""
        self.discriminator.requires_grad_(True)
        self.d_optimizer.zero_grad(set_to_none=True)
        d_loss = al_discriminator_loss(self.discriminator, t_logits, s_logits)
        d_loss.backward()
        self.d_optimizer.step()
        self.discriminator.requires_grad_(False)  # the student's backward leaves D alone
        return float(d_loss.detach())

    def loss(self, student, images, idx):
        """Discriminator step, then KD + al_weight * BCE(D(centred student logits), 1)."""
        logits = student(images)
        t_logits = self.t_logits[idx]
        d_loss = self.discriminator_step(t_logits, centre(logits))
        kd = kd_kl(logits, t_logits, self.cfg.tau)
        adv = al_student_adversarial(self.discriminator, centre(logits))
        loss = kd + self.cfg.al_weight * adv
        return loss, {"kd": float(kd.detach()), "adv": float(adv.detach()), "disc": d_loss}
