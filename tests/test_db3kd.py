"""DB3KD (decision-based): soft labels from distances, the vectorised boundary search on a
hand-built teacher, the query cap, and a hard-label run through the real engine."""

import json
import math

import pytest
import torch

from b2kd.blackbox import BlackBoxError
from b2kd.core.checkpoint import read
from b2kd.distill.methods.db3kd import MAX_DISTANCE, boundary_distances, boundary_soft_labels
from b2kd.edge import Ledger
from b2kd.pipeline import run_distill, run_teacher


def test_boundary_soft_labels_by_hand():
    t = 0.5
    ln = math.log
    # image 0 (label 0): logits 0, -ln 2, -ln 4 -> (1, 1/2, 1/4) / 7/4; its own entry (9.0) is ignored
    # image 1 (label 2): logits -ln 3, -ln 3, 0 -> (1/3, 1/3, 1) / 5/3
    d = torch.tensor([[9.0, t * ln(2), t * ln(4)], [t * ln(3), t * ln(3), 0.0]])
    p = boundary_soft_labels(d, torch.tensor([0, 2]), t)
    assert torch.allclose(p, torch.tensor([[4 / 7, 2 / 7, 1 / 7], [1 / 5, 1 / 5, 3 / 5]]), atol=1e-6)
    assert d[0, 0] == 9.0  # the input is left alone


class MeanTeacher:
    """A hand-built decision-only teacher: the label is the band of the mean pixel
    (< 100: 0, < 170: 1, else 2). Records everything it is asked."""

    def __init__(self):
        self.asked = []

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        m = x.float().flatten(1).mean(1)
        return (m >= 100).long() + (m >= 170).long()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8
        self.asked.append(x.clone())
        return self.labels(x)


def test_boundary_distance_on_a_known_boundary():
    teacher = MeanTeacher()
    x0 = torch.full((1, 1, 4, 4), 50, dtype=torch.uint8)
    ex = torch.full((1, 1, 4, 4), 200, dtype=torch.uint8)  # label 2, but the label leaves 0 at mean 100
    steps = 8
    d, queries = boundary_distances(teacher, x0, teacher.labels(x0), ex, teacher.labels(ex), steps, 1,
                                    torch.Generator().manual_seed(0), num_classes=3)
    # lambda* = (100 - 50) / 150 = 1/3; the search returns the upper end of a 2^-steps bracket,
    # give or take half a grey level of rounding (0.5 / 150 in lambda)
    lam = d[0, 2].item() / (150 / 255)
    assert 1 / 3 - 0.5 / 150 <= lam <= 1 / 3 + 2**-steps + 0.5 / 150
    assert d[0, 0] == 0 and d[0, 1] == MAX_DISTANCE  # own class; class 1 has no exemplar
    assert queries.tolist() == [steps] and len(teacher.asked) == steps
    assert all(len(a) == 1 for a in teacher.asked)  # one batched query per halving


def test_boundary_search_brackets_every_flip_stays_in_range_and_respects_the_cap():
    rng = torch.Generator().manual_seed(3)
    teacher = MeanTeacher()
    x0 = torch.randint(10, 90, (4, 1, 4, 4), dtype=torch.uint8, generator=rng)  # label 0
    bank = torch.cat([
        torch.randint(120, 160, (3, 1, 4, 4), dtype=torch.uint8, generator=rng),  # label 1
        torch.randint(200, 250, (3, 1, 4, 4), dtype=torch.uint8, generator=rng),  # label 2
        torch.randint(10, 90, (2, 1, 4, 4), dtype=torch.uint8, generator=rng),  # label 0: never used
    ])
    labels, bank_labels = teacher.labels(x0), teacher.labels(bank)
    assert labels.tolist() == [0] * 4 and bank_labels.tolist() == [1, 1, 1, 2, 2, 2, 0, 0]
    steps, dirs = 6, 3  # three directions: every exemplar of a class, so the minimum is known
    d, queries = boundary_distances(teacher, x0, labels, bank, bank_labels, steps, dirs,
                                    torch.Generator().manual_seed(0), num_classes=4)
    # 2 classes with exemplars x 3 directions x 6 halvings; class 3 has none and costs nothing
    assert queries.tolist() == [2 * dirs * steps] * 4
    assert len(teacher.asked) == steps and sum(len(a) for a in teacher.asked) == int(queries.sum())
    asked = torch.cat(teacher.asked)
    assert asked.dtype == torch.uint8 and asked.min() >= 10 and asked.max() <= 250  # convex: in range
    assert (d[:, 0] == 0).all() and (d[:, 3] == MAX_DISTANCE).all()
    # brute force on a fine grid: the first lambda whose rounded blend leaves label 0
    grid = torch.linspace(0, 1, 10001)
    for i in range(4):
        for k in (1, 2):
            lows, highs = [], []
            for e in (bank_labels == k).nonzero().flatten():
                blend = ((1 - grid.view(-1, 1, 1, 1)) * x0[i].float() + grid.view(-1, 1, 1, 1) * bank[e].float())
                flip = int((teacher.labels(blend.round().to(torch.uint8)) != 0).nonzero()[0])
                span = (bank[e].float() - x0[i].float()).norm().item() / 255 / 4
                lows.append(grid[flip - 1].item() * span)
                highs.append((grid[flip].item() + 2**-steps) * span)
            assert min(lows) <= d[i, k].item() <= min(highs)


def test_boundary_search_with_an_empty_bank_spends_nothing():
    teacher = MeanTeacher()
    x0 = torch.full((2, 1, 2, 2), 30, dtype=torch.uint8)
    d, queries = boundary_distances(teacher, x0, teacher.labels(x0), x0[:0], torch.zeros(0, dtype=torch.long),
                                    4, 1, torch.Generator().manual_seed(0), num_classes=3)
    assert queries.tolist() == [0, 0] and not teacher.asked
    assert d.tolist() == [[0.0, MAX_DISTANCE, MAX_DISTANCE]] * 2


@pytest.fixture(scope="module")
def toy_cfg(toy_runs, tmp_path_factory):
    """The toy config with a teacher better than chance (the shared toy teacher labels
    nearly every image alike, which would leave the exemplar bank a single class)."""
    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.teacher.checkpoint, cfg.teacher.epochs, cfg.teacher.batch_size = None, 6, 16
    out = tmp_path_factory.mktemp("db3kd-teacher")
    run_teacher(cfg, out, log=lambda *a: None)
    cfg.teacher.checkpoint = str(out / "teacher.pt")
    cfg.seed = 0
    cfg.deprivatize.generator = None  # DB3KD queries the private images and blends of them
    d = cfg.distill
    d.method, d.response, d.budget, d.epochs = "db3kd", "hard", 600, 10
    d.db3kd_search_steps, d.db3kd_query_cap = 3, 60  # 10 classes: 2 directions, 55 queries an image
    return cfg


def test_db3kd_trains_on_hard_labels_within_budget_and_cap_and_resumes_free(toy_cfg, tmp_path):
    run_dir = tmp_path / "run"
    summary = run_distill(toy_cfg, run_dir, log=lambda *a: None)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert 0 < summary["queries"] <= 600
    with Ledger(run_dir / "ledger.sqlite") as ledger:
        assert ledger.count() == summary["queries"]
    pool = read(run_dir / "db3kd-pool.pt", "pool")
    assert len(pool["images"]) == 600 // 55 == summary["pool_size"]
    assert pool["queries"].max() <= 60  # the per-image cap (queries sent; repeats were free)
    assert summary["queries"] <= int(pool["queries"].sum())
    assert len(pool["labels"].unique()) > 3  # the bank holds several of the teacher's classes
    again = run_distill(toy_cfg, run_dir, log=lambda *a: None)
    assert again["queries"] == summary["queries"]
    with Ledger(run_dir / "ledger.sqlite") as ledger:
        assert ledger.count() == summary["queries"]


@pytest.mark.parametrize(("cap", "budget", "match"), [
    (50, 600, "db3kd_query_cap"),  # one direction per class needs 1 + 9 x 6 = 55
    (60, 54, "budget too small"),
])
def test_db3kd_refuses_a_cap_or_budget_too_small(toy_cfg, tmp_path, cap, budget, match):
    cfg = toy_cfg.model_copy(deep=True)
    cfg.distill.db3kd_search_steps, cfg.distill.db3kd_query_cap, cfg.distill.budget = 6, cap, budget
    with pytest.raises(BlackBoxError, match=match):
        run_distill(cfg, tmp_path / "run", log=lambda *a: None)
    with Ledger(tmp_path / "run" / "ledger.sqlite") as ledger:
        assert ledger.count() == 0
