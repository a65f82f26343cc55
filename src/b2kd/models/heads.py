"""A distilled student split at its penultimate layer: one body, its old head and a new one.

Every b2kd classifier ends in a linear layer (LeNet-5, cnn_small, the ResNets, VGG,
MobileNet); the body is the student with that layer replaced by the identity, so it
returns the penultimate features, normalisation included. Either head put back on the
body is an ordinary classifier of the same architecture (:meth:`TwoHeads.classifier`),
which ``load_classifier``, ``b2kd export`` and ``b2kd predict`` read like any other.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from b2kd.core.checkpoint import CheckpointError
from b2kd.models import Classifier, build_model


def output_layer(model: nn.Module) -> str:
    """The name of the model's last linear layer, checked to be what gives its logits."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise CheckpointError(f"the {getattr(model, 'arch', '?')} student has no linear output layer")
    return names[-1]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class TwoHeads(nn.Module):
    """``forward`` gives (old-task logits, new-task logits) of one pass through the body."""

    def __init__(self, student: Classifier, new_classes: int, seed: int = 0):
        super().__init__()
        self.head_name = output_layer(student)
        self.body = copy.deepcopy(student).requires_grad_(True)  # the caller's student stays as it is
        self.old_head = self.body.get_submodule(self.head_name)
        _replace(self.body, self.head_name, nn.Identity())
        torch.manual_seed(seed)
        self.new_head = nn.Linear(self.old_head.in_features, new_classes)
        self._check(student)

    @torch.no_grad()
    def _check(self, student: Classifier) -> None:
        """The old head on the body must give the student's own logits (else the split is wrong)."""
        student.eval()
        self.eval()
        c = student.config
        x = torch.randint(0, 256, (2, c["in_channels"], c["image_size"], c["image_size"]), dtype=torch.uint8)
        device = next(student.parameters()).device
        if not torch.allclose(self(x.to(device))[0], student(x.to(device)), atol=1e-5):
            raise CheckpointError(f"cannot put a new head on the {student.arch} student: its last"
                                  f" linear layer ({self.head_name}) does not give its logits")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return self.old_head(f), self.new_head(f)

    def classifier(self, task: str) -> Classifier:
        """The body with the ``"old"`` or ``"new"`` head: a plain classifier, in eval mode, on the CPU."""
        head = {"old": self.old_head, "new": self.new_head}[task]
        model = build_model(**{**self.body.config, "num_classes": head.out_features})
        state = {k: v.detach().cpu() for k, v in self.body.state_dict().items()}
        state.update({f"{self.head_name}.{k}": v.detach().cpu() for k, v in head.state_dict().items()})
        model.load_state_dict(state)
        return model.eval()
