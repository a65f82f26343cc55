"""Mixup among paid generator images: the mixtures and the choice by hand, and a toy run."""

import torch

from b2kd.pool.mixup import least_sure, mixtures


def test_mixtures_are_convex_combinations_of_two_pool_images():
    images = torch.stack([torch.full((1, 2, 2), v, dtype=torch.uint8) for v in (0, 100, 200)])
    mixed = mixtures(images, 50, torch.Generator().manual_seed(0))
    assert mixed.dtype == torch.uint8 and mixed.shape == (50, 1, 2, 2)
    # every pixel of a mixture of constant images is one value within [0.3, 0.7] of the way
    values = mixed.flatten(1)
    assert (values == values[:, :1]).all()
    assert set(values[:, 0].tolist()) <= set(range(0, 201))


def test_least_sure_takes_the_lowest_top_probabilities():
    probs = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.99, 0.01]])
    assert sorted(least_sure(probs, 2).tolist()) == [1, 2]


def test_mixup_share_pays_within_budget_and_resumes_free(toy_runs, tmp_path):
    from b2kd.data.edge_sets import edge_private_images
    from b2kd.edge import Ledger
    from b2kd.pipeline import run_distill

    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.distill.mixup_share = 0.25
    run_distill(cfg, tmp_path / "run", lambda *a, **k: None)
    assert (tmp_path / "run" / "pool-mixup.pt").is_file()
    with Ledger(tmp_path / "run" / "ledger.sqlite") as ledger:
        paid = ledger.totals()["queries"]
        assert 0 < paid <= cfg.distill.budget
        assert ledger.private_images_sent(edge_private_images(cfg)) == 0
    run_distill(cfg, tmp_path / "run", lambda *a, **k: None)  # the same command again: nothing new paid
    with Ledger(tmp_path / "run" / "ledger.sqlite") as ledger:
        assert ledger.totals()["queries"] == paid
