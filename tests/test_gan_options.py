"""Deprivatization's options: the discriminator (spectral norm, its own rate) and extra latents."""

from __future__ import annotations

import json
import math

import torch

from b2kd.core.checkpoint import read


def test_spectral_norm_and_d_lr_reach_the_trained_discriminator(toy_runs, tmp_path):
    from b2kd.pipeline import run_deprivatize

    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.deprivatize.generator = None
    cfg.deprivatize.epochs = 1
    cfg.deprivatize.spectral_norm = True
    cfg.deprivatize.d_lr = 4 * cfg.deprivatize.lr
    out = tmp_path / "gan"
    report = run_deprivatize(cfg, out, log=lambda *a, **k: None)
    assert report["private_images_sent"] == 0
    state = read(out / "checkpoints" / "gan_latest.pt", "gan_state")
    assert [g["lr"] for g in state["opt_d"]["param_groups"]] == [4 * cfg.deprivatize.lr]
    assert [g["lr"] for g in state["opt_g"]["param_groups"]] == [cfg.deprivatize.lr]
    keys = state["discriminator"].keys()
    assert any(k.endswith("parametrizations.weight.original") for k in keys)
    assert not any("running_mean" in k for k in keys)  # no BatchNorm in a spectrally normalised D
    assert all(torch.isfinite(v).all() for v in state["discriminator"].values() if v.is_floating_point())


def test_resuming_a_gan_made_with_another_discriminator_is_one_clear_error(toy_runs, tmp_path):
    """A gan_latest.pt made with a plain D, resumed with spectral norm on: a CheckpointError that
    names the file (no load_state_dict traceback), and the checkpoint is left as it was."""
    import pytest

    from b2kd.core.checkpoint import CheckpointError
    from b2kd.pipeline import run_deprivatize

    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.deprivatize.generator = None
    cfg.deprivatize.epochs = 1
    out = tmp_path / "gan"
    run_deprivatize(cfg, out, log=lambda *a, **k: None)
    latest = out / "checkpoints" / "gan_latest.pt"
    before = latest.read_bytes()
    cfg.deprivatize.epochs = 2
    cfg.deprivatize.spectral_norm = True
    from b2kd.core.config import ConfigError

    # the run directory's config says so first (b2kd.core.run_dir) ...
    with pytest.raises(ConfigError, match=r"deprivatize.spectral_norm: False -> True"):
        run_deprivatize(cfg, out, log=lambda *a, **k: None)
    assert latest.read_bytes() == before
    (out / "config.yaml").unlink()  # ... and without one (an older run), the checkpoint does
    with pytest.raises(CheckpointError, match=r"cannot resume from .*gan_latest\.pt: its discriminator"):
        run_deprivatize(cfg, out, log=lambda *a, **k: None)
    assert latest.read_bytes() == before


def test_extra_latents_train_a_wider_generator_that_mekd_reads(toy_runs, tmp_path):
    """deprivatize.latent_extra widens G's latent; MEKD's alignment feeds it logits padded with 0."""
    from b2kd.models.load import load_generator
    from b2kd.pipeline import run_deprivatize, run_distill

    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.deprivatize.generator = None
    cfg.deprivatize.epochs = 1
    cfg.deprivatize.latent_extra = 6
    gan = run_deprivatize(cfg, tmp_path / "gan", log=lambda *a, **k: None)
    generator, _ = load_generator(gan["generator"])
    assert generator.latent_dim == 10 + 6 and generator.fc.in_features == 16
    cfg.deprivatize.generator = gan["generator"]
    cfg.distill.method = "mekd"
    run_distill(cfg, tmp_path / "mekd", log=lambda *a, **k: None)
    metrics = [json.loads(line) for line in (tmp_path / "mekd" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(math.isfinite(m["loss"]) and m["align"] > 0 for m in metrics)
