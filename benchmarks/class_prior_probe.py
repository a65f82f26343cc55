"""Probe: does shifting a finished student's class biases on the device close the synthetic-to-real
gap? (A measurement on finished cells; nothing in b2kd does this.)

The student learns each class from the generator's images, and on the device's images it predicts
some classes too seldom (Fashion-MNIST's shirt). On the device, without a label or a query, its
ten output biases can be moved so that its mean prediction over the private images matches a
target class mix (the EM-style prior correction of Saerens et al., 2002, with the target given).
Three targets are tried:

- ``teacher-on-G``: the teacher's mean answer on the pool's random part (the generator's images,
  paid for already), the only estimate of the private class mix that needs no private label;
- ``teacher-on-G-top1``: the same, counting the teacher's top-1 answers;
- ``uniform``: a balanced private set (an assumption, not an estimate: false under imbalance).

Dev accuracy before and after each, per class; the cells are ``synthetic_to_real.py``'s
(``--out`` of that script). Example:

    .venv/bin/python benchmarks/class_prior_probe.py runs/s2r/fashion_mnist/mekd-sn20lr4nd-soft-s0 \
        --csv probe.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from b2kd.core.config import load_config
from b2kd.core.metrics import accuracy, per_class_accuracy
from b2kd.data.edge_sets import edge_dev_set, edge_private_images
from b2kd.models.load import load_classifier


@torch.no_grad()
def logits_of(model: torch.nn.Module, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def fit_biases(logits: torch.Tensor, target: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Biases b such that the mean of softmax(logits + b) over the rows is the target mix."""
    b = torch.zeros(logits.shape[1])
    for _ in range(steps):
        mean = torch.softmax(logits + b, 1).mean(0)
        b = b + 0.5 * (target.log() - mean.log())
    return b


def probe(cell: Path) -> list[dict]:
    cfg = load_config(cell / "config.yaml")
    student, _ = load_classifier(cell / "checkpoints" / "best.pt")
    teacher, _ = load_classifier(cfg.teacher.checkpoint)
    student.eval()
    teacher.eval()
    dev_x, dev_y = edge_dev_set(cfg)
    private = logits_of(student, edge_private_images(cfg))
    dev = logits_of(student, dev_x)
    classes = dev.shape[1]
    answers = torch.softmax(logits_of(teacher, torch.load(cell / "pool.pt")["images"]), 1)
    targets = {
        "none": None,
        "teacher-on-G": answers.mean(0),
        "teacher-on-G-top1": torch.bincount(answers.argmax(1), minlength=classes).float() / len(answers),
        "uniform": torch.full((classes,), 1 / classes),
    }
    rows = []
    for name, target in targets.items():
        shifted = dev if target is None else dev + fit_biases(private, target.clamp_min(1e-4))
        pred = shifted.argmax(1)
        rows.append({"dataset": cfg.data.dataset, "cell": cell.name, "target": name,
                     "dev_acc": round(100 * accuracy(pred, dev_y), 2),
                     "dev_per_class": [round(100 * a, 2) for a in per_class_accuracy(pred, dev_y, classes)]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cells", nargs="+", type=Path, help="finished synthetic_to_real.py cells")
    parser.add_argument("--csv", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = [row for cell in args.cells for row in probe(cell)]
    for row in rows:
        print(f"{row['dataset']:14} {row['cell']:28} {row['target']:18} {row['dev_acc']:6.2f}  "
              f"{row['dev_per_class']}")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
