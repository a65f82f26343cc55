"""A classifier's top-1 predictions and its accuracy, fidelity and per-class accuracy.

What the teacher's training reports on the test set and what the evaluate stage
(:mod:`b2kd.evaluate.run`) reports for the students; no stage selects a model on the test set.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Top-1 labels of uint8 images, in eval mode, on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model(images[i : i + batch_size].to(device)).argmax(1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return float((pred == labels).float().mean())


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    accs = []
    for k in range(num_classes):
        mask = labels == k
        accs.append(float((pred[mask] == k).float().mean()) if mask.any() else float("nan"))
    return accs


def evaluate(
    student: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    teacher_pred: torch.Tensor | None = None,
) -> dict:
    """Accuracy, fidelity (top-1 agreement with the teacher) and per-class accuracy, as fractions."""
    pred = predict(student, images)
    result = {
        "acc": accuracy(pred, labels),
        "per_class_acc": per_class_accuracy(pred, labels, num_classes),
    }
    if teacher_pred is not None:
        result["fidelity"] = accuracy(pred, teacher_pred)
    return result
