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


def test_patience_keeps_the_closest_generator_and_stops(toy_runs, tmp_path, monkeypatch):
    """Distances 3, 2, 2.5, 1 with patience 1: epoch 2 is the closest, epoch 3 is not closer, so
    training stops after it and generator.pt holds epoch 2's weights, recorded as 2 epochs."""
    import json

    from b2kd.deprivatize import distance
    from b2kd.models.load import load_generator
    from b2kd.pipeline import run_deprivatize

    values = iter([3.0, 2.0, 2.5, 1.0])
    monkeypatch.setattr(distance.PrivateDistance, "__call__", lambda self, gen: next(values))
    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.deprivatize.generator = None
    cfg.deprivatize.epochs = 4
    cfg.deprivatize.patience = 1
    out = tmp_path / "gan"
    lines = []
    run_deprivatize(cfg, out, log=lines.append)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["distance"] for r in records] == [3.0, 2.0, 2.5]
    assert any("stopped after epoch 3; the generator of epoch 2" in line for line in lines)
    state = read(out / "checkpoints" / "gan_latest.pt", "gan_state")
    assert state["best"]["epoch"] == 1 and state["best"]["distance"] == 2.0
    gen, meta = load_generator(out / "generator.pt")
    assert meta["epochs"] == 2
    for key, value in gen.state_dict().items():
        assert torch.equal(value, state["best"]["generator"][key]), key
    assert any(not torch.equal(v, state["generator"][k]) for k, v in gen.state_dict().items()
               if v.is_floating_point())  # the last epoch's weights are not the ones kept
    # run again: the rule had stopped, so no epoch is trained and nothing more is paid
    ledger_before = (out / "ledger.sqlite").read_bytes()
    run_deprivatize(cfg, out, log=lines.append)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "ledger.sqlite").read_bytes() == ledger_before
    gen_again, meta_again = load_generator(out / "generator.pt")
    assert meta_again["epochs"] == 2
    assert all(torch.equal(v, gen_again.state_dict()[k]) for k, v in gen.state_dict().items())


def test_without_patience_every_epoch_runs_and_no_distance_is_measured(toy_runs, tmp_path, monkeypatch):
    import json

    from b2kd.deprivatize import distance
    from b2kd.pipeline import run_deprivatize

    monkeypatch.setattr(distance.PrivateDistance, "__call__", lambda self, gen: 1 / 0)
    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.deprivatize.generator = None
    cfg.deprivatize.epochs = 2
    out = tmp_path / "gan"
    run_deprivatize(cfg, out, log=lambda *a, **k: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and not any("distance" in r for r in records)
