"""The penultimate layer of any b2kd classifier: what its last linear layer reads.

Every b2kd classifier ends in a linear layer (:func:`b2kd.models.heads.output_layer`); its input is
the network's embedding of an image. :class:`Penultimate` hooks that layer, so one ordinary
forward pass gives both the logits and the features, with no second pass and no change to
the model (the hook also fires inside DistributedDataParallel and on channels-last models).
A gray-box teacher discloses this vector as its ``embedding`` output; a student's is
matched to it through a learned projection (:mod:`b2kd.distill.feature_match`).
"""

from __future__ import annotations

import torch
from torch import nn


def output_linear(model: nn.Module) -> nn.Linear:
    """The model's last linear layer (the one that gives its logits; :func:`b2kd.models.heads.output_layer`)."""
    from b2kd.models.heads import output_layer

    return model.get_submodule(output_layer(model))


class Penultimate:
    """Records the input of ``model``'s output layer at every forward pass (``.last``)."""

    def __init__(self, model: nn.Module, first_only: bool = False):
        self.layer = output_linear(model)
        self.dim = int(self.layer.in_features)
        self.last: torch.Tensor | None = None
        # first_only: keep the first pass after ``armed`` is set (later passes, such as another
        # loss term's on other images, leave it alone); else every pass replaces it
        self.first_only = first_only
        self.armed = True
        self._handle = self.layer.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        if self.first_only and not self.armed:
            return
        self.last = args[0]
        self.armed = False

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> Penultimate:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, penultimate features) of ``model`` on ``images``, in eval mode, float32, in batches."""
    model.eval()
    logits, features = [], []
    with Penultimate(model) as hook:
        for i in range(0, len(images), batch_size):
            logits.append(model(images[i : i + batch_size]).float())
            features.append(hook.last.float().flatten(1))
    return torch.cat(logits), torch.cat(features)
