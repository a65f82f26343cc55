"""The KD, ML, AL and DKD baselines end to end through the real engine, on the toy teacher."""

import json
import math

import pytest

from b2kd.blackbox import BlackBoxError
from b2kd.edge import Ledger
from b2kd.pipeline import run_distill

BASELINES = ["kd", "ml", "al", "dkd"]


def _config(toy_runs, method, response="soft"):
    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.seed = 0
    cfg.deprivatize.generator = None  # these methods query the private images
    d = cfg.distill
    d.method, d.response, d.budget, d.epochs = method, response, 150, 3
    return cfg


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_trains_within_budget(toy_runs, tmp_path, method):
    run_dir = tmp_path / method
    summary = run_distill(_config(toy_runs, method), run_dir, log=lambda *a: None)
    losses = [
        json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert 0 < summary["queries"] <= 150
    ledger = Ledger(run_dir / "ledger.sqlite")
    try:
        assert ledger.count() == summary["queries"]
    finally:
        ledger.close()


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_refuses_hard_label_teacher(toy_runs, tmp_path, method):
    with pytest.raises(BlackBoxError, match="needs soft responses"):
        run_distill(_config(toy_runs, method, "hard"), tmp_path / method, log=lambda *a: None)
