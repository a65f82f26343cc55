"""DAFL: the white-box reference method (generator loss terms, a tiny run, refusals)."""

import json
import math

import pytest
import torch

from b2kd.blackbox import BlackBoxError, LocalBackend, ResponseKind
from b2kd.core.config import ConfigError, DistillConfig
from b2kd.distill.methods import get_method
from b2kd.distill.methods.base import Acquisition
from b2kd.distill.methods.dafl import DAFL, dafl_generator_loss
from b2kd.edge import BlackBoxTeacher, Ledger
from b2kd.models import load_classifier


def test_generator_loss_matches_hand_computed_terms():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    features = torch.tensor([[1.0, -2.0], [0.5, -0.5]])
    e, e2 = math.e, math.e**2

    one_hot = (-math.log(e2 / (e2 + 2)) - math.log(e / (e + 2))) / 2
    activation = -(1 + 2 + 0.5 + 0.5) / 4
    p1 = [e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)]
    p2 = [1 / (e + 2), e / (e + 2), 1 / (e + 2)]
    mean_p = [(a + b) / 2 for a, b in zip(p1, p2, strict=True)]
    neg_entropy = sum(m * math.log(m) for m in mean_p)

    total, parts = dafl_generator_loss(logits, features)
    assert parts["one_hot"] == pytest.approx(one_hot, rel=1e-5)
    assert parts["activation"] == pytest.approx(activation, rel=1e-6)
    assert parts["entropy"] == pytest.approx(neg_entropy, rel=1e-5)
    assert float(total) == pytest.approx(one_hot + 0.1 * activation + 5 * neg_entropy, rel=1e-5)


def test_generator_loss_on_uniform_logits():
    """Equal logits: CE is log K and the batch mean is uniform, so the entropy term is -log K."""
    total, parts = dafl_generator_loss(torch.zeros(4, 5), torch.zeros(4, 3))
    assert parts["one_hot"] == pytest.approx(math.log(5), rel=1e-6)
    assert parts["activation"] == 0
    assert parts["entropy"] == pytest.approx(-math.log(5), rel=1e-6)
    assert float(total) == pytest.approx(math.log(5) - 5 * math.log(5), rel=1e-6)


def test_generator_loss_gradient_reaches_inputs():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    features = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    total, _ = dafl_generator_loss(logits, features)
    total.backward()
    assert logits.grad.abs().sum() > 0 and features.grad.abs().sum() > 0


def _dafl_cfg(toy_runs):
    cfg = toy_runs["cfg"].model_copy(deep=True)
    cfg.distill.method = "dafl"
    cfg.deprivatize.generator = None
    d = cfg.distill
    d.dafl_steps, d.dafl_batch_size, d.budget, d.epochs, d.batch_size = 20, 32, 150, 3, 16
    return cfg


def test_dafl_run_end_to_end(toy_runs, tmp_path):
    from b2kd.pipeline import run_distill

    cfg = _dafl_cfg(toy_runs)
    before = load_classifier(cfg.teacher.checkpoint)[0].state_dict()
    run = tmp_path / "run"
    summary = run_distill(cfg, run, log=lambda *a: None)

    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert summary["queries"] <= cfg.distill.budget
    assert summary["pool_size"] == cfg.distill.budget
    with Ledger(run / "ledger.sqlite") as ledger:
        assert ledger.count() == summary["queries"]

    steps = [json.loads(line) for line in (run / "dafl.jsonl").read_text().splitlines()]
    assert len(steps) == 20 and all(math.isfinite(s["loss"]) for s in steps)
    first, last = (sum(s["loss"] for s in part) / 5 for part in (steps[:5], steps[-5:]))
    assert last < first
    assert (run / "dafl-generator.pt").is_file()

    after = load_classifier(cfg.teacher.checkpoint)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # a rerun reuses the generator and the pool and pays for nothing again
    stamp = (run / "dafl-generator.pt").stat().st_mtime_ns
    again = run_distill(cfg, run, log=lambda *a: None)
    assert (run / "dafl-generator.pt").stat().st_mtime_ns == stamp
    assert again["queries"] == summary["queries"]


def test_acquire_leaves_the_local_teacher_as_it_was(toy_runs, tmp_path):
    """The teacher object is shared with the backend: no weight, grad, flag or mode may change."""
    cfg = _dafl_cfg(toy_runs)
    cfg.distill.dafl_steps = 3
    backend = LocalBackend.from_checkpoint(cfg.teacher.checkpoint, "hard")
    model = backend.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = BlackBoxTeacher(backend, Ledger(tmp_path / "ledger.sqlite"), budget=100)
    method = get_method("dafl")(cfg.distill, teacher.kind)
    acq = Acquisition(teacher=teacher, budget=40, seed=0, device=torch.device("cpu"), out=tmp_path,
                      student=torch.nn.Identity(), fit=lambda *a: None, query_batch=16,
                      local_model=model)
    images, responses = method.acquire(acq)

    assert images.dtype == torch.uint8 and images.shape == (40, *teacher.image_shape)
    assert responses.shape == (40, teacher.num_classes)
    assert teacher.ledger.count() == 40
    assert not model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # a new pool size redraws the pool from the stored generator, which is not trained again
    stamp = (tmp_path / "dafl-generator.pt").stat().st_mtime_ns
    acq.budget = 30
    images, _ = method.acquire(acq)
    assert len(images) == 30
    assert (tmp_path / "dafl-generator.pt").stat().st_mtime_ns == stamp
    teacher.ledger.close()


def test_refused_against_a_remote_teacher(toy_runs, tmp_path):
    from b2kd.pipeline import run_distill

    cfg = _dafl_cfg(toy_runs)
    cfg.teacher.url = "http://127.0.0.1:9"
    with pytest.raises(ConfigError, match="white-box"):
        run_distill(cfg, tmp_path / "run", log=lambda *a: None)


def test_acquire_without_the_local_model_is_refused(tmp_path):
    method = DAFL(DistillConfig(method="dafl"), ResponseKind.parse("soft"))  # no generator needed
    acq = Acquisition(teacher=None, budget=10, seed=0, device=torch.device("cpu"), out=tmp_path,
                      student=torch.nn.Identity(), fit=lambda *a: None)
    with pytest.raises(BlackBoxError, match="white-box"):
        method.acquire(acq)
    assert DAFL.white_box and DAFL.source == "white-box" and not DAFL.needs_soft
