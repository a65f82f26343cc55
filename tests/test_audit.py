"""``b2kd audit``: planted near-copies are flagged, unrelated images are not, and on real
runs Knockoff (which sends private images) fails where MEKD (generator images) passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from b2kd.cli import app
from b2kd.data import load_dataset
from b2kd.evaluate.audit import audit, audit_run
from b2kd.evaluate.ssim import ssim
from b2kd.pool.paid import load_or_sample_private, sample_private


def test_ssim_of_identical_constant_and_noisy_images():
    rng = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8, generator=rng)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-5)
    noisy = (x.float() + 40 * torch.randn(x.shape, generator=rng)).clamp(0, 255).to(torch.uint8)
    assert (ssim(x, noisy) < 0.9).all()
    assert torch.allclose(ssim(x, noisy), ssim(noisy, x))
    # Two flat images: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.2, 0.6, 0.01**2
    flat = torch.stack([torch.full((1, 16, 16), a), torch.full((1, 16, 16), b)])
    got = ssim(flat[:1], flat[1:])
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-4)
    # Images smaller than the 11 px window still work (the window shrinks).
    assert ssim(x[:, :, :8, :8], x[:, :, :8, :8]).shape == (4,)


def test_ssim_matches_a_direct_2d_gaussian_implementation():
    """The batched matrix form against the textbook one: an 11x11 Gaussian (sigma 1.5)
    'valid' 2-D convolution per channel, C1 = 0.01^2, C2 = 0.03^2 for data in [0, 1]."""
    rng = torch.Generator().manual_seed(2)
    a = torch.rand(5, 3, 20, 24, generator=rng, dtype=torch.float64)
    b = (a + 0.2 * torch.rand(a.shape, generator=rng, dtype=torch.float64)).clamp(0, 1)
    x = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(x**2) / (2 * 1.5**2))
    kernel = (torch.outer(g, g) / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, kernel, groups=3)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ref = (
        (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    ).mean((1, 2, 3))
    assert torch.allclose(ssim(a.float(), b.float()).double(), ref, atol=1e-4)


@pytest.fixture(scope="module")
def digits(toy_runs):
    cfg = toy_runs["cfg"].data
    return (
        load_dataset(cfg.dataset, "train", cfg.root).images,
        load_dataset(cfg.dataset, "test", cfg.root).images,
    )


def test_planted_copies_are_flagged_and_unrelated_images_are_not(digits):
    train, test = digits
    private, holdout = train[:200], train[200:500]
    rng = torch.Generator().manual_seed(1)
    exact = private[:10]
    noise = torch.randint(-10, 11, (10, 1, 28, 28), generator=rng)
    perturbed = (private[10:20].int() + noise).clamp(0, 255).to(torch.uint8)  # light, everywhere
    noise_images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8, generator=rng)
    blank = torch.zeros(5, 1, 28, 28, dtype=torch.uint8)
    sent = torch.cat([exact, perturbed, noise_images, blank])

    summary, got = audit(sent, private, holdout)
    assert summary["near_copies"] == 20
    assert summary["near_copy_fraction"] == pytest.approx(20 / len(sent))
    assert summary["exact_private_copies"] == 10
    t = summary["threshold"]
    flagged = (got["l2"] < t["l2"]) | (got["ssim"] > t["ssim"])
    assert flagged[:20].all() and not flagged[20:].any()
    assert (got["idx"][:20] == torch.arange(20)).all()  # each copy is matched to its original
    assert got["l2"][:10].max() < 1e-6 and torch.allclose(
        got["ssim"][:10], torch.ones(10), atol=1e-5
    )

    # New real digits of the same distribution (the test split): not copies. The threshold is
    # the held-out extreme, so each is flagged with probability about 2 / (300 + 1) (L2 or
    # SSIM beyond all 300 held-out images): expect ~0.7 of 100, allow 3.
    summary, _ = audit(test[:100], private, holdout)
    assert summary["exact_private_copies"] == 0 and summary["near_copies"] <= 3


def test_private_pool_is_seeded_capped_and_reused(tmp_path):
    private = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 4, 4).contiguous()
    pool = load_or_sample_private(private, 20, 3, tmp_path / "pool.pt")
    assert len(pool) == 20 and len(set(pool[:, 0, 0, 0].tolist())) == 20  # distinct images
    assert torch.equal(pool, sample_private(private, 20, 3))
    assert not torch.equal(pool, sample_private(private, 20, 4))
    assert torch.equal(load_or_sample_private(private, 20, 3, tmp_path / "pool.pt"), pool)
    assert len(load_or_sample_private(private, 500, 3, tmp_path / "pool.pt")) == 50  # capped


def test_knockoff_pays_for_a_seeded_subset_of_the_private_images(toy_runs):
    from b2kd.core.checkpoint import read
    from b2kd.core.config import load_config
    from b2kd.data.edge_sets import edge_private_images
    from b2kd.edge import Ledger, image_hashes

    run = toy_runs["kn"]
    assert load_config(run / "config.yaml").deprivatize.generator is None  # none was needed
    pool = read(run / "pool.pt", "pool")
    private = edge_private_images(toy_runs["cfg"])
    assert pool["source"] == "local" and len(pool["images"]) == len(private) == 200  # capped
    assert set(image_hashes(pool["images"])) == set(image_hashes(private))
    with Ledger(run / "ledger.sqlite") as ledger:
        assert ledger.totals()["queries"] == 200
        assert ledger.private_images_sent(private) == 200
    assert read(run / "checkpoints" / "best.pt", "classifier")["meta"]["method"] == "kn"


def test_knockoff_run_is_flagged_and_mekd_run_is_not(toy_runs):
    kn = audit_run(toy_runs["kn"])
    mekd = audit_run(toy_runs["mekd"])

    assert kn["sent_images"] == kn["queries"] == 200  # the whole private set, capped at its size
    assert kn["exact_private_copies"] == 200 and kn["near_copy_fraction"] == 1.0
    assert kn["verdict"].startswith("FAIL: 200 of the 200 images sent (100.00%)")
    assert mekd["sent_images"] == mekd["queries"] == 200
    assert mekd["near_copies"] == 0 and mekd["exact_private_copies"] == 0
    assert mekd["verdict"].startswith("PASS: none of the 200 images sent")
    for r in (kn, mekd):
        assert r["bytes_sent"] == 200 * 28 * 28
        assert r["private_images"] == 200 and r["holdout_images"] == 600
        assert f"L2 < {r['threshold']['l2']:.3f}" in r["verdict"]
        run = toy_runs["kn"] if r is kn else toy_runs["mekd"]
        assert json.loads((run / "audit.json").read_text())["near_copies"] == r["near_copies"]
        assert r["verdict"] in (run / "audit.md").read_text()
        with Image.open(run / "images" / "audit_closest.png") as im:  # 16 pairs, 8 images a row
            assert im.size == (8 * 30 + 2, 4 * 30 + 2)
    # The grid's first pair of a Knockoff run is an image and its identical private original.
    with Image.open(toy_runs["kn"] / "images" / "audit_closest.png") as im:
        grid = np.asarray(im)
    assert (grid[2:30, 2:30] == grid[2:30, 32:60]).all()


def test_audit_cli_and_its_user_errors(toy_runs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(toy_runs["kn"]), "--holdout", "100"])
    assert result.exit_code == 0, result.output
    assert "FAIL: 200 of the 200 images sent" in result.stdout
    assert "100 held-out real images" in result.stdout

    no_ledger = tmp_path / "no-ledger"
    no_ledger.mkdir()
    (no_ledger / "config.yaml").write_text((toy_runs["kn"] / "config.yaml").read_text())
    for args, needle in (
        ([no_ledger], "has no ledger.sqlite"),
        ([tmp_path], "not a b2kd run directory"),
        ([toy_runs["kn"], "--quantile", "0.7"], "quantile must be in"),
    ):
        result = runner.invoke(app, ["audit", *map(str, args)])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (
            result.output
        )
