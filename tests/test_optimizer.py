"""The student's optimiser (distill.optimizer): AdamW reaches the trained student, and a run
resumed with the other optimiser is one clear error, not a traceback."""

from __future__ import annotations

import pytest
import torch

from b2kd.checkpoint import CheckpointError, read
from b2kd.engine import make_optimizer


def test_make_optimizer_builds_adamw_with_momentum_as_its_first_beta():
    net = torch.nn.Linear(3, 2)
    opt = make_optimizer(net, 1e-3, 0.8, 1e-2, "adamw")
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.8, 0.999), 1e-2)
    assert isinstance(make_optimizer(net, 0.1, 0.9, 5e-4), torch.optim.SGD)


def test_adamw_distillation_and_resume_with_another_optimiser(toy_runs, tmp_path):
    from b2kd.pipeline import run_distill

    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.distill.optimizer = "adamw"
    cfg.distill.lr = 1e-3
    cfg.distill.epochs = 1
    out = tmp_path / "run"
    run_distill(cfg, out, log=lambda *a, **k: None)
    state = read(out / "checkpoints" / "latest.pt", "classifier")["train_state"]
    assert state["optimizer_kind"] == "AdamW"
    assert all("exp_avg_sq" in s for s in state["optimizer"]["state"].values())
    before = (out / "checkpoints" / "latest.pt").read_bytes()
    cfg.distill.optimizer = "sgd"
    cfg.distill.epochs = 2
    with pytest.raises(CheckpointError, match=r"trained with AdamW, this run uses SGD"):
        run_distill(cfg, out, log=lambda *a, **k: None)
    assert (out / "checkpoints" / "latest.pt").read_bytes() == before
