"""AM (active mixup): vectorised mixups, least-confident selection, and a run through the real engine."""

import json
import math

import pytest
import torch

from b2kd.core.checkpoint import read
from b2kd.distill.methods.active_mixup import least_confident, mixup, mixup_pairs, round_sizes
from b2kd.edge import Ledger
from b2kd.pipeline import run_distill, run_teacher


class PixelConfidence(torch.nn.Module):
    """A stub student: logits (first pixel / 25, 0), so confidence grows with the first pixel."""

    def forward(self, x):
        a = x.flatten(1)[:, 0].float() / 25
        return torch.stack([a, torch.zeros_like(a)], 1)


def test_mixups_are_convex_uint8_combinations_of_distinct_pairs():
    rng = torch.Generator().manual_seed(0)
    private = torch.randint(0, 256, (7, 1, 4, 4), dtype=torch.uint8, generator=rng)
    i, j, lam = mixup_pairs(len(private), 500, torch.Generator().manual_seed(1))
    assert (i != j).all() and ((lam >= 0) & (lam <= 1)).all()
    x = mixup(private, i, j, lam)
    assert x.dtype == torch.uint8 and x.shape == (500, 1, 4, 4)
    lo = torch.minimum(private[i], private[j])
    hi = torch.maximum(private[i], private[j])
    assert ((x >= lo) & (x <= hi)).all()
    expect = (lam[3] * private[i[3]].float() + (1 - lam[3]) * private[j[3]].float()).round()
    assert torch.equal(x[3], expect.to(torch.uint8))
    # seeded: the same generator seed draws the same pairs and weights
    again = mixup_pairs(len(private), 500, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip((i, j, lam), again))


def test_least_confident_picks_the_lowest_top_probability_and_restores_train_mode():
    rng = torch.Generator().manual_seed(0)
    private = torch.randint(0, 256, (20, 1, 3, 3), dtype=torch.uint8, generator=rng)
    pairs = mixup_pairs(len(private), 64, torch.Generator().manual_seed(5))
    student = PixelConfidence().train()
    pick = least_confident(student, private, pairs, 10, torch.device("cpu"), batch=7)
    assert student.training
    first_pixel = mixup(private, *pairs).flatten(1)[:, 0].float()
    # the ten chosen are ten of the lowest first pixels (as a multiset: ties may go either way)
    assert torch.equal(first_pixel[pick].sort().values, first_pixel.sort().values[:10])
    assert len(set(pick.tolist())) == 10


def test_round_sizes_split_evenly_and_sum_to_the_total():
    assert round_sizes(10, 3) == [4, 3, 3]
    assert round_sizes(2, 3) == [1, 1, 0]
    assert sum(round_sizes(101, 4)) == 101


@pytest.fixture(scope="module")
def toy_cfg(toy_runs, tmp_path_factory):
    """The toy config with a teacher that is better than chance (the shared toy teacher,
    2 epochs at batch 128, labels nearly every image alike: AM's choices would mean little)."""
    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.teacher.checkpoint, cfg.teacher.epochs, cfg.teacher.batch_size = None, 6, 16
    out = tmp_path_factory.mktemp("am-teacher")
    run_teacher(cfg, out, log=lambda *a: None)
    cfg.teacher.checkpoint = str(out / "teacher.pt")
    return cfg


def _config(toy_cfg, response):
    cfg = toy_cfg.model_copy(deep=True)
    cfg.seed = 0
    cfg.deprivatize.generator = None  # AM queries mixups of the private images
    d = cfg.distill
    d.method, d.response, d.budget, d.epochs = "am", response, 160, 10
    d.batch_size = 16  # 9 steps an epoch: enough for the loss to fall (one step an epoch is noise)
    d.am_seed_fraction, d.am_cycles, d.am_candidates, d.am_fit_steps = 0.5, 2, 4, 5
    return cfg


@pytest.mark.parametrize("response", ["soft", "hard"])
def test_am_trains_within_budget_and_resumes_without_paying(toy_cfg, tmp_path, response):
    run_dir = tmp_path / "run"
    cfg = _config(toy_cfg, response)
    summary = run_distill(cfg, run_dir, log=lambda *a: None)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert 0 < summary["queries"] <= 160
    with Ledger(run_dir / "ledger.sqlite") as ledger:
        assert ledger.count() == summary["queries"]
    pool = read(run_dir / "am-pool.pt", "pool")
    assert pool["done"] == 3 and pool["pending"] is None
    assert len(pool["images"]) == 160 == summary["pool_size"]  # 80 seed + 40 + 40 mixups
    again = run_distill(cfg, run_dir, log=lambda *a: None)
    assert again["queries"] == summary["queries"]


class Interrupted(Exception):
    pass


def test_am_interrupted_mid_round_resumes_to_the_same_pool_without_paying_twice(
    toy_cfg, tmp_path, monkeypatch
):
    import b2kd.distill.methods.active_mixup as am

    cfg = _config(toy_cfg, "soft")
    cfg.distill.epochs = 1
    cfg.distill.query_batch = 16  # seed set: 5 chunks, each round: 3 chunks
    whole = run_distill(cfg, tmp_path / "whole", log=lambda *a: None)
    real_pay, chunks = am.pay, []

    def pay_then_die(teacher, images, chunk=500, on_chunk=None):
        def count(spent):
            chunks.append(spent)
            if len(chunks) == 7:  # killed after the second chunk of the first mixup round
                raise Interrupted
        return real_pay(teacher, images, chunk, count)

    monkeypatch.setattr(am, "pay", pay_then_die)
    with pytest.raises(Interrupted):
        run_distill(cfg, tmp_path / "cut", log=lambda *a: None)
    monkeypatch.setattr(am, "pay", real_pay)
    with Ledger(tmp_path / "cut" / "ledger.sqlite") as ledger:
        assert ledger.count() == chunks[-1] == 80 + 32
    resumed = run_distill(cfg, tmp_path / "cut", log=lambda *a: None)
    assert resumed["queries"] == whole["queries"]
    a, b = read(tmp_path / "whole" / "am-pool.pt", "pool"), read(tmp_path / "cut" / "am-pool.pt", "pool")
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["responses"], b["responses"])
