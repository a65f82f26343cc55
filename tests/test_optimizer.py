"""The student's optimiser is SGD with momentum; a run made with another (AdamW, an option of
earlier b2kd versions) resumed now is one clear error, not a traceback."""

from __future__ import annotations

import pytest
import torch

from b2kd.core.checkpoint import CheckpointError, atomic_save, read
from b2kd.core.engine import make_optimizer


def test_make_optimizer_builds_sgd_with_momentum():
    opt = make_optimizer(torch.nn.Linear(3, 2), 0.1, 0.9, 5e-4)
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 5e-4)


def test_resuming_a_run_made_with_another_optimiser(toy_runs, tmp_path):
    from b2kd.pipeline import run_distill

    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.distill.epochs = 1
    out = tmp_path / "run"
    run_distill(cfg, out, log=lambda *a, **k: None)
    latest = out / "checkpoints" / "latest.pt"
    ckpt = read(latest, "classifier")
    assert ckpt["train_state"]["optimizer_kind"] == "SGD"
    ckpt["train_state"]["optimizer_kind"] = "AdamW"  # as an earlier b2kd wrote it with AdamW
    atomic_save(ckpt, latest)
    before = latest.read_bytes()
    with pytest.raises(CheckpointError, match=r"trained with AdamW, this run uses SGD"):
        run_distill(cfg, out, log=lambda *a, **k: None)
    assert latest.read_bytes() == before
