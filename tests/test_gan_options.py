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


def test_d_dropout_sets_the_discriminators_dropout_layers():
    from torch import nn

    from b2kd.models import Discriminator

    def rates(disc):
        return [m.p for m in disc.modules() if isinstance(m, nn.Dropout2d)]

    assert rates(Discriminator(28, 1, spectral_norm=True, dropout=0.0)) == []
    assert rates(Discriminator(28, 1, spectral_norm=True, dropout=0.25)) == [0.25] * 4
    assert Discriminator(28, 1, dropout=0.0).config["dropout"] == 0.0


def test_the_realism_filter_reads_a_gan_state_of_either_dropout(tmp_path):
    """An older run without discriminator.pt: D is rebuilt from gan_latest.pt, whose layer indices
    say whether it was made with dropout."""
    from b2kd.core.checkpoint import atomic_save, save_generator
    from b2kd.models import Discriminator, Generator
    from b2kd.pool.realism import load_discriminator

    gen = Generator(10, 28, 1, (8, 4))
    for dropout in (0.0, 0.25):
        run = tmp_path / f"d{dropout}"
        (run / "checkpoints").mkdir(parents=True)
        save_generator(gen, run / "generator.pt", role="generator")
        disc = Discriminator(28, 1, spectral_norm=True, dropout=dropout)
        atomic_save({"kind": "gan_state", "discriminator": disc.state_dict()},
                    run / "checkpoints" / "gan_latest.pt")
        loaded = load_discriminator(run / "generator.pt")
        assert loaded.config["dropout"] == dropout
        x = torch.rand(3, 1, 28, 28) * 2 - 1
        assert torch.allclose(loaded(x), disc.eval()(x))


def test_the_gan_trains_channels_last_and_its_generator_loads_in_either_layout(toy_runs):
    """G and D train with channels-last weights (cheaper convolution steps on the CPU); the saved
    generator loads into the default layout and draws the same images as in channels-last."""
    import copy
    from pathlib import Path

    from toy import assert_trained_channels_last

    from b2kd.core.runtime import fast_layout
    from b2kd.models import load_generator

    state = read(Path(toy_runs["generator"]).parent / "checkpoints" / "gan_latest.pt", "gan_state")
    for module in ("generator", "discriminator"):
        assert_trained_channels_last(state[module])
    gen, meta = load_generator(toy_runs["generator"])
    assert all(p.is_contiguous() for p in gen.parameters())
    z = torch.randn(8, meta["num_classes"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = gen.eval()(z)
        fast = fast_layout(copy.deepcopy(gen)).eval()(z)
    assert torch.allclose(dense, fast, atol=1e-5)
