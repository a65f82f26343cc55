"""MEKD: align G(student logits) with G(teacher logits) through the frozen generator, plus KL."""

from __future__ import annotations

import torch

from b2kd.blackbox import teacher_logits
from b2kd.core.runtime import fast_layout
from b2kd.distill.losses import mekd_loss
from b2kd.distill.methods.base import Method


class MEKD(Method):
    name = "mekd"
    source = "generator"
    needs_soft = False

    @torch.no_grad()
    def prepare(self, responses: torch.Tensor, device: torch.device) -> None:
        """Teacher logits and G(t / tau_g), once per paid image (they depend only on the query)."""
        fast_layout(self.generator.to(device)).eval().requires_grad_(False)
        self.t_logits = teacher_logits(responses, self.kind).to(device)
        self.t_images = torch.cat(
            [
                self.generator(self.t_logits[i : i + 128] / self.cfg.tau_g)
                for i in range(0, len(self.t_logits), 128)
            ]
        )

    def loss(self, student, images, idx):
        return mekd_loss(
            self.generator,
            student(images),
            self.t_logits[idx],
            self.t_images[idx],
            tau_g=self.cfg.tau_g,
            tau=self.cfg.tau,
            beta=self.cfg.beta,
            distance=self.cfg.distance,
            hard_ce=self.kind.is_hard and self.cfg.hard_loss == "ce",
        )
