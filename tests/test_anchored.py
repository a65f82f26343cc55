"""Queries anchored on inverted private images, their transferred labels, and CORAL alignment:
values by hand, and a toy distillation that sends no private image and none under the floor."""

import pytest
import torch

from b2kd.distill.coral import coral
from b2kd.models.gan import Generator
from b2kd.pool.anchored import AnchorLabels, anchor_targets, invert, nearest_l2, privacy_floor
from b2kd.pool.paid import render


def test_coral_by_hand():
    s = torch.tensor([[0.0, 0.0], [2.0, 0.0]])  # cov: [[2, 0], [0, 0]]
    t = torch.tensor([[0.0, 0.0], [0.0, 2.0]])  # cov: [[0, 0], [0, 2]]
    assert coral(s, t).item() == pytest.approx((4 + 4) / (4 * 4))
    assert coral(s, s + 5).item() == pytest.approx(0.0)  # a shift is not a difference of covariance


def test_anchor_targets_average_each_anchors_answers():
    owner = torch.tensor([3, 1, 3, 3])
    probs = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.0, 1.0], [0.5, 0.5]])
    idx, targets = anchor_targets(owner, probs)
    assert idx.tolist() == [1, 3]
    assert torch.allclose(targets, torch.tensor([[0.2, 0.8], [0.5, 0.5]]))


def test_nearest_l2_matches_brute_force_and_skips_self():
    g = torch.Generator().manual_seed(0)
    refs = torch.randint(0, 256, (30, 1, 4, 4), generator=g, dtype=torch.uint8)
    queries = torch.randint(0, 256, (7, 1, 4, 4), generator=g, dtype=torch.uint8)
    brute = torch.cdist(queries.flatten(1).float() / 255, refs.flatten(1).float() / 255).min(1).values
    assert torch.allclose(nearest_l2(queries, refs), brute, atol=1e-4)
    assert (nearest_l2(refs, refs) < 1e-3).all()  # each image is its own nearest
    own = torch.cdist(refs.flatten(1).float() / 255, refs.flatten(1).float() / 255)
    own.fill_diagonal_(float("inf"))
    assert torch.allclose(nearest_l2(refs, refs, exclude_self=True), own.min(1).values, atol=1e-4)
    assert privacy_floor(refs, 0.5) == pytest.approx(float(own.min(1).values.median()), abs=0.05)


def test_inversion_finds_latents_that_redraw_the_image():
    torch.manual_seed(0)
    gen = Generator(latent_dim=10, image_size=28, channels=1, widths=[16, 8]).eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    z_true = torch.randn(16, 10)
    images = render(gen, z_true)
    z = invert(gen, images, steps=200, seed=0)
    start = torch.randn(16, 10, generator=torch.Generator().manual_seed(104729))

    def paired(zs):  # each redrawn image against its own target
        return (render(gen, zs).float() - images.float()).flatten(1).norm(dim=1).mean()

    assert paired(z) < 0.7 * paired(start)


def test_anchor_labels_term_is_the_soft_cross_entropy():
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    torch.nn.init.zeros_(student[1].weight)
    torch.nn.init.zeros_(student[1].bias)  # uniform logits: CE = log 2 whatever the target
    private = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    term = AnchorLabels(private, torch.tensor([0, 2]), torch.tensor([[0.9, 0.1], [0.3, 0.7]]), 4, 2.0,
                        lambda x, generator=None: x.float(), torch.device("cpu"))
    loss, parts = term.loss(student, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(2.0 * torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    assert parts["anchor"] == pytest.approx(0.6931, abs=1e-4)


def test_anchored_distillation_sends_no_private_image_and_none_under_the_floor(toy_runs, tmp_path):
    from b2kd.core.checkpoint import read
    from b2kd.data.edge_sets import edge_private_images
    from b2kd.edge import Ledger
    from b2kd.pipeline import run_distill

    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.distill.anchor_share = 0.5
    cfg.distill.anchor_sd = 0.3
    cfg.distill.coral_weight = 1.0
    run_distill(cfg, tmp_path / "run", lambda *a, **k: None)
    private = edge_private_images(cfg)
    floor = privacy_floor(private, cfg.distill.anchor_floor, seed=cfg.seed)
    stored = read(tmp_path / "run" / "pool-anchored.pt", "pool")["images"]
    images = stored[:, :-8].reshape(len(stored), *private.shape[1:])
    assert 0 < len(images) <= 100
    assert (nearest_l2(images, private) >= floor).all()
    with Ledger(tmp_path / "run" / "ledger.sqlite") as ledger:
        assert ledger.private_images_sent(private) == 0
        assert ledger.totals()["queries"] <= cfg.distill.budget
    assert (tmp_path / "run" / "val-slice.pt").is_file()
