"""The evaluate stage: a distillation run's test-set report (``b2kd evaluate RUN``).

The test set is used here and nowhere else: no stage selects a model on it. Fidelity needs
the teacher's labels on the test set; they come from the evaluator's own copy of the teacher
(a checkpoint), not from paid queries (:mod:`b2kd.evaluate.fidelity` pays for them when there
is no copy).
"""

from __future__ import annotations

import json
from pathlib import Path

from b2kd import __version__
from b2kd.core.config import Config
from b2kd.core.metrics import evaluate, predict
from b2kd.core.run_dir import load_run_config
from b2kd.core.runtime import hardware
from b2kd.data import load_dataset
from b2kd.data.edge_sets import edge_dev_set, edge_private_images
from b2kd.edge import Ledger
from b2kd.edge.connect import teacher_checkpoint
from b2kd.models import load_classifier


def run_evaluate(run_dir: str | Path, cfg: Config | None = None) -> dict:
    """Test-set report of a distillation run: last and best-on-validation students."""
    from b2kd.evaluate.report import write_report
    from b2kd.evaluate.synthetic_gap import synthetic_vs_real
    from b2kd.pool import labels as pool_labels

    run_dir = Path(run_dir)
    if cfg is None:
        cfg = load_run_config(run_dir)
    d = cfg.data
    test = load_dataset(d.dataset, "test", d.root, d.image_size, d.channels)
    teacher_pred = None  # fidelity needs a local copy of the teacher; a served teacher alone has none
    if cfg.teacher.checkpoint or not cfg.teacher.url:
        teacher, _ = load_classifier(teacher_checkpoint(cfg))
        teacher_pred = predict(teacher, test.images)
    result: dict = {
        "run": str(run_dir),
        "b2kd_version": __version__,
        "hardware": hardware(),
        "method": cfg.distill.method,
        "response": cfg.distill.response,
        "budget": cfg.distill.budget,
        "teacher_acc": None if teacher_pred is None else float((teacher_pred == test.labels).float().mean()),
    }
    for name in ("latest", "best"):
        path = run_dir / "checkpoints" / f"{name}.pt"
        student, meta = load_classifier(path)
        result[name] = {**evaluate(student, test.images, test.labels, test.num_classes, teacher_pred),
                        "epoch": meta.get("epoch")}
    if d.dev_size:
        dev_images, dev_labels = edge_dev_set(cfg)
        for name in ("latest", "best"):
            student, _ = load_classifier(run_dir / "checkpoints" / f"{name}.pt")
            result[name]["dev_acc"] = float((predict(student, dev_images) == dev_labels).float().mean())
        result["dev_acc"] = result["best"]["dev_acc"]
        best, _ = load_classifier(run_dir / "checkpoints" / "best.pt")
        result["synthetic_vs_real"] = synthetic_vs_real(best, run_dir, dev_images, dev_labels, test.num_classes)
    result["student_acc"] = result["best"]["acc"]
    result["fidelity"] = result["best"].get("fidelity")
    ledger_path = run_dir / "ledger.sqlite"
    if ledger_path.is_file():
        with Ledger(ledger_path) as ledger:
            result.update(ledger.totals())
            result["private_images_sent"] = ledger.private_images_sent(edge_private_images(cfg))
    summary_path = run_dir / "distill.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        result["train_img_per_s"] = summary.get("train_img_per_s")
        result["best_epoch"] = summary.get("best_epoch")
    result["pool_labels"] = pool_labels.run_summary(run_dir, cfg.distill.response,
                                                    cfg.distill.thin_class_factor)
    write_report(run_dir, result)
    return result
