"""Teacher accuracy and fidelity for a served teacher with no local copy, paid for on request.

``b2kd evaluate RUN --pay-fidelity N`` sends N test images (a seeded sample) to
the run's teacher through its ledger, as stage ``fidelity``: those queries are
counted apart from the pool (they spend no distillation budget and are not in
the run's query totals) and are cached like any other, so evaluating again
pays nothing. The teacher's labels on them give its accuracy and each
student's top-1 agreement (fidelity), both on those N images only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from b2kd.blackbox import top1
from b2kd.core.config import ConfigError
from b2kd.core.metrics import accuracy, predict
from b2kd.edge import BlackBoxTeacher, Ledger

STAGE = "fidelity"


def sample(n: int, total: int, seed: int) -> torch.Tensor:
    """Indices of the N test images paid for: a seeded sample (a test set may be sorted by class)."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed + 104729))[:n]


def evaluate_with_paid_fidelity(run_dir: str | Path, n: int, api_key: str | None = None,
                                log=print) -> dict:
    """The run's report (b2kd.evaluate.run.run_evaluate), with teacher accuracy and fidelity from N paid
    test images when the run has no local teacher checkpoint."""
    from b2kd.core.run_dir import load_run_config
    from b2kd.data import load_dataset
    from b2kd.edge.client import HTTPTeacher
    from b2kd.evaluate.report import write_report
    from b2kd.evaluate.run import run_evaluate
    from b2kd.models import load_classifier
    from b2kd.pool.paid import pay

    run_dir = Path(run_dir)
    if n < 1:
        raise ConfigError(f"--pay-fidelity takes a number of test images >= 1, got {n}")
    cfg = load_run_config(run_dir)
    cfg.teacher.api_key = api_key or cfg.teacher.api_key
    result = run_evaluate(run_dir, cfg)
    if result["teacher_acc"] is not None:
        log("the run has a local teacher checkpoint: teacher accuracy and fidelity come from it,"
            " on the whole test set; nothing paid")
        return result
    d = cfg.data
    test = load_dataset(d.dataset, "test", d.root, d.image_size, d.channels)
    if n > len(test):
        raise ConfigError(f"--pay-fidelity {n}: the test set has {len(test)} images")
    idx = sample(n, len(test), cfg.seed)
    images, labels = test.images[idx], test.labels[idx]
    with HTTPTeacher.from_config(cfg.teacher) as backend, Ledger(run_dir / "ledger.sqlite") as ledger:
        teacher = BlackBoxTeacher(backend, ledger, budget=None, stage=STAGE)
        before = ledger.count(STAGE)
        teacher_pred = top1(pay(teacher, images))
        paid_now, paid_all = ledger.count(STAGE) - before, ledger.count(STAGE)
    result["teacher_acc"] = accuracy(teacher_pred, labels)
    for name in ("latest", "best"):
        student, _ = load_classifier(run_dir / "checkpoints" / f"{name}.pt")
        result[name]["fidelity"] = accuracy(predict(student, images), teacher_pred)
    result["fidelity"] = result["best"]["fidelity"]
    result.update(fidelity_images=n, fidelity_queries=paid_all)
    write_report(run_dir, result)
    with (run_dir / "report.md").open("a") as report:
        report.write(f"\nTeacher accuracy and fidelity: on {n} test images paid for through the ledger"
                     f" (stage '{STAGE}', {paid_all} queries, apart from the pool's).\n")
    log(f"teacher accuracy and fidelity from {n} paid test images ({paid_now} paid now,"
        f" {paid_all} in all, counted apart from the pool)")
    return result
