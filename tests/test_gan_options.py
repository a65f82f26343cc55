"""Deprivatization's discriminator options: spectral normalisation and its own learning rate."""

from __future__ import annotations

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
