"""In-process teacher backend: a checkpoint answered as an API would answer it."""

from __future__ import annotations

from pathlib import Path

import torch

from b2kd.blackbox.base import BackendAnswer, BlackBoxError, Provider
from b2kd.blackbox.responses import ResponseKind


class LocalBackend:
    """Runs the teacher model locally but exposes only what the API would return."""

    def __init__(self, model: torch.nn.Module, kind: ResponseKind | str = "soft", batch_size: int = 256):
        self._model = model.eval()
        self.kind = ResponseKind.parse(kind)
        self.num_classes = int(model.num_classes)
        self.image_shape = (int(model.in_channels), int(model.image_size), int(model.image_size))
        self.batch_size = batch_size
        # every in-process checkpoint is one provider, 'local': the ledger tells its answers
        # from a served teacher's, not one checkpoint's from another's
        self.provider = Provider("local", response=str(self.kind))
        self.embedding_dim = None
        if self.kind.embedding:
            from b2kd.models.penultimate import output_linear

            self.embedding_dim = output_linear(model).in_features

    @property
    def model(self) -> torch.nn.Module:
        """The network itself: for white-box reference methods (DAFL) only, never for queries."""
        return self._model

    @classmethod
    def from_checkpoint(cls, path: str | Path, kind: ResponseKind | str = "soft") -> LocalBackend:
        from b2kd.models import load_classifier

        model, _ = load_classifier(path)
        return cls(model, kind)

    @torch.no_grad()
    def infer(self, images: torch.Tensor) -> BackendAnswer:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.image_shape:
            raise BlackBoxError(
                f"the teacher accepts uint8 images of shape (N, {', '.join(map(str, self.image_shape))}),"
                f" got {tuple(images.shape)} {images.dtype}"
            )
        from b2kd.models.penultimate import embed

        if self.kind.embedding:
            logits, features = embed(self._model, images, self.batch_size)
        else:  # no hook, no feature copies: the common case stays as cheap as before
            logits = torch.cat([self._model(images[i : i + self.batch_size]).float()
                                for i in range(0, len(images), self.batch_size)])
            features = None
        per_image = int(images[0].numel())  # 1 byte per pixel
        return BackendAnswer(
            responses=self.kind.apply(torch.softmax(logits, dim=1)),
            bytes_sent=[per_image] * len(images),
            bytes_received=[self.kind.wire_bytes(self.num_classes, self.embedding_dim or 0)] * len(images),
            embeddings=features,
        )
