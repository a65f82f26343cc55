"""Per class, how far what the student learnt on generator images carries over to real ones.

The student trains on paid generator images. Its agreement with the teacher on the pool's
held-out slice (synthetic images, grouped by the class the teacher gave them) says how well it
learnt to read the generator's class c; its accuracy on the dev split (real, labelled images
outside the private set) says how well it reads real class c. The gap between them, class by
class, is the synthetic-to-real distance: a class that reads high on the generator's images and
low on real ones is one the student learnt from images that do not look like the device's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from b2kd.core.metrics import predict
from b2kd.distill.run import VAL_SLICE  # what distillation writes: the pool's held-out slice


def per_class(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[list, list[int]]:
    """Per class: the share of rows whose prediction equals the label (None without rows), and counts."""
    shares, counts = [], []
    for c in range(num_classes):
        mask = labels == c
        counts.append(int(mask.sum()))
        shares.append(float((pred[mask] == c).float().mean()) if mask.any() else None)
    return shares, counts


def synthetic_vs_real(student: torch.nn.Module, run_dir: str | Path, dev_images: torch.Tensor,
                      dev_labels: torch.Tensor, num_classes: int) -> dict | None:
    """The table's figures for one student (None when the run kept no held-out slice)."""
    from b2kd.core.checkpoint import read

    path = Path(run_dir) / VAL_SLICE
    if not path.is_file():
        return None
    held = read(path, "val_slice")
    synth, n_synth = per_class(predict(student, held["images"]), held["teacher_top1"], num_classes)
    real, n_real = per_class(predict(student, dev_images), dev_labels, num_classes)
    gap = [None if s is None or r is None else s - r for s, r in zip(synth, real)]
    known = [g for g in gap if g is not None]
    return {"synthetic_agree": synth, "synthetic_n": n_synth, "real_acc": real, "real_n": n_real,
            "gap": gap, "mean_gap": sum(known) / len(known) if known else None,
            "worst_class": max(range(num_classes), key=lambda c: -1 if gap[c] is None else gap[c])}


def markdown(table: dict | None, class_names: list[str] | None = None) -> list[str]:
    """The report's section: one row per class."""
    if table is None:
        return []
    pct = (lambda x: "-" if x is None else f"{100 * x:.1f}")
    lines = ["", "## Synthetic to real, per class (best student)", "",
             "Agreement with the teacher on the paid pool's held-out generator images (by the teacher's"
             " class) beside accuracy on the dev split's real images; a large gap is a class learnt from"
             " images unlike the device's.", "",
             "| class | synthetic agreement % (n) | real dev accuracy % (n) | gap (points) |", "|---|---|---|---|"]
    for c, gap in enumerate(table["gap"]):
        name = class_names[c] if class_names else str(c)
        lines.append(f"| {name} | {pct(table['synthetic_agree'][c])} ({table['synthetic_n'][c]})"
                     f" | {pct(table['real_acc'][c])} ({table['real_n'][c]}) | {pct(gap)} |")
    if table["mean_gap"] is not None:
        lines.append(f"\nMean gap {100 * table['mean_gap']:.1f} points; largest in class {table['worst_class']}.")
    return lines
