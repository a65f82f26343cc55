"""The student's optimisation step: gradient-norm cap, and Knockoff's temperature."""

import torch

from b2kd.blackbox import ResponseKind
from b2kd.core.config import DistillConfig
from b2kd.distill.losses import kd_kl
from b2kd.distill.methods.kd import KD
from b2kd.distill.methods.knockoff import Knockoff
from b2kd.distill.step import train_step


def _setup():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    probs = torch.softmax(torch.randn(8, 3) * 3, dim=1)
    images = torch.randn(8, 1, 4, 4)
    return student, probs, images


def test_grad_clip_caps_the_global_gradient_norm():
    student, probs, images = _setup()
    method = KD(DistillConfig(), ResponseKind.parse("soft"))
    method.prepare(probs, torch.device("cpu"))
    idx = torch.arange(8)
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    train_step(method, student, opt, images, idx, grad_clip=0.01)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, student.parameters())])
    assert abs(step.norm().item() - 0.01) < 1e-6  # lr 1: the step is the clipped gradient itself

    unclipped, _, _ = _setup()
    opt = torch.optim.SGD(unclipped.parameters(), lr=1.0)
    train_step(method, unclipped, opt, images, idx)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, unclipped.parameters())])
    assert step.norm().item() > 0.1  # the cap was doing something


def test_knockoff_trains_on_the_answers_at_temperature_one_and_kd_at_tau():
    student, probs, images = _setup()
    cfg = DistillConfig(tau=5.0)
    kn, kd = Knockoff(cfg, ResponseKind.parse("soft")), KD(cfg, ResponseKind.parse("soft"))
    for m in (kn, kd):
        m.prepare(probs, torch.device("cpu"))
    idx = torch.arange(8)
    logits = student(images)
    t = torch.log(probs) - torch.log(probs).mean(1, keepdim=True)
    expected_kn = (probs * (torch.log(probs) - torch.log_softmax(logits, 1))).sum(1).mean()
    assert torch.allclose(kn.loss(student, images, idx)[0], expected_kn, atol=1e-5)
    assert torch.allclose(kd.loss(student, images, idx)[0], kd_kl(logits, t, 5.0), atol=1e-5)
