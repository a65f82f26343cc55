"""The balanced pool's realism filter: deprivatization's D scores free candidates."""

from __future__ import annotations

import pytest
import torch

from b2kd.core.checkpoint import CheckpointError, atomic_save, read
from b2kd.models import Discriminator
from b2kd.pool.realism import drop_least_real, load_discriminator, realism


def test_drop_least_real_by_hand():
    pred = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    scores = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0, 7.0, -9.0])
    keep = drop_least_real(pred, scores, 0.5)
    # class 0 drops its 2 lowest (-1.0, 0.5), class 1 its lowest (-4.0), class 2 (one candidate) nothing
    assert keep.tolist() == [True, False, False, True, False, True, True]
    assert drop_least_real(pred, scores, 0.0).all()


def test_realism_is_ds_logit_on_gan_range_images():
    torch.manual_seed(0)
    disc = Discriminator(28, 1, spectral_norm=True).eval()
    images = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = disc(images.float() / 127.5 - 1.0).flatten()
    assert torch.allclose(realism(disc, images, batch=3), expected, atol=1e-6)


def test_deprivatize_saves_d_and_distill_reads_it(toy_runs, tmp_path):
    from pathlib import Path

    gan_dir = Path(toy_runs["generator"]).parent
    saved = read(gan_dir / "discriminator.pt", "discriminator")
    disc = load_discriminator(toy_runs["generator"])
    assert not disc.training and not any(p.requires_grad for p in disc.parameters())
    for key, value in saved["state_dict"].items():
        assert torch.equal(disc.state_dict()[key], value)
    # a run made before discriminator.pt existed: D is read from the last GAN state
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    (old / "generator.pt").write_bytes((gan_dir / "generator.pt").read_bytes())
    atomic_save({"kind": "gan_state", "discriminator": saved["state_dict"]}, old / "checkpoints" / "gan_latest.pt")
    again = load_discriminator(old / "generator.pt")
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(realism(again, x), realism(disc, x))
    with pytest.raises(CheckpointError, match="discriminator"):
        load_discriminator(tmp_path / "nowhere" / "generator.pt")


def test_realism_filter_pays_for_images_d_rates_more_real(toy_runs, tmp_path):
    from b2kd.data.edge_sets import edge_private_images
    from b2kd.edge import Ledger
    from b2kd.pipeline import run_distill

    rests = {}
    for share in (0.0, 0.5):
        cfg = toy_runs["cfg"].model_copy(deep=True)
        cfg.distill.pool, cfg.distill.balance_fit_steps, cfg.distill.balance_realism = "balanced", 5, share
        summary = run_distill(cfg, tmp_path / f"r{share}", lambda *a, **k: None)
        assert summary["queries"] == cfg.distill.budget == summary["pool_size"]
        with Ledger(tmp_path / f"r{share}" / "ledger.sqlite") as ledger:
            assert ledger.private_images_sent(edge_private_images(cfg)) == 0
        rests[share] = read(tmp_path / f"r{share}" / "pool-balanced.pt", "pool")
    assert rests[0.5]["source"].endswith("-realism-0.5") and "realism" not in rests[0.0]["source"]
    disc = load_discriminator(toy_runs["generator"])
    plain, filtered = (realism(disc, rests[s]["images"]) for s in (0.0, 0.5))
    # dropping the lower half of a score raises its mean by about 0.8 sd (0.0 if D were ignored)
    assert filtered.mean() - plain.mean() > 0.4 * plain.std()


def test_realism_without_a_balanced_pool_is_refused(toy_runs, tmp_path):
    from b2kd.core.config import ConfigError
    from b2kd.pipeline import run_distill

    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.distill.pool, cfg.distill.balance_realism = "random", 0.5
    with pytest.raises(ConfigError, match="distill.pool=balanced"):
        run_distill(cfg, tmp_path / "random", lambda *a, **k: None)
    assert not (tmp_path / "random" / "ledger.sqlite").exists()  # refused before anything is paid
