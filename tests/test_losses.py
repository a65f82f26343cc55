"""Every loss against values computed by hand with the math module."""

import math

import pytest
import torch

from b2kd.deprivatize.losses import (
    gan_discriminator_loss,
    gan_generator_loss,
    information_maximisation,
)
from b2kd.distill.losses import generator_alignment, kd_kl, mekd_loss


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_kl_tau_one():
    t = torch.tensor([[math.log(0.75), math.log(0.25)]])
    s = torch.zeros(1, 2)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_kl(s, t, tau=1.0).item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_tau_squared_scaling():
    t_logits, s_logits, tau = [2.0, -1.0, 0.5], [0.3, 0.1, -0.2], 5.0
    expected = tau**2 * _kl(_softmax([x / tau for x in t_logits]), _softmax([x / tau for x in s_logits]))
    got = kd_kl(torch.tensor([s_logits]), torch.tensor([t_logits]), tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_batch_mean_and_zero_at_match():
    t = torch.randn(4, 10)
    assert kd_kl(t.clone(), t, 5.0).item() == pytest.approx(0.0, abs=1e-6)
    single = [kd_kl(torch.zeros(1, 10), t[i : i + 1], 5.0).item() for i in range(4)]
    assert kd_kl(torch.zeros(4, 10), t, 5.0).item() == pytest.approx(sum(single) / 4, rel=1e-5)


class _LinearG(torch.nn.Module):
    """A generator whose output we can compute by hand: image = W z."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [0.5, 2.0]]), requires_grad=False)

    def forward(self, z):
        return z @ self.w.T


def test_generator_alignment_centres_and_scales_student_logits():
    g = _LinearG()
    s = torch.tensor([[4.0, 0.0]])  # centred [2, -2], / tau_g=2 -> [1, -1]
    # G([1, -1]) = [1*1 + -1*-1, 0.5*1 + 2*-1] = [2, -1.5]
    t_img = torch.tensor([[1.0, 0.5]])
    l1 = generator_alignment(g, s, t_img, tau_g=2.0)
    assert l1.item() == pytest.approx((abs(2 - 1) + abs(-1.5 - 0.5)) / 2)
    l2 = generator_alignment(g, s, t_img, tau_g=2.0, distance="l2")
    assert l2.item() == pytest.approx((1**2 + 2**2) / 2)
    with pytest.raises(ValueError):
        generator_alignment(g, s, t_img, 2.0, distance="cos")


def test_mekd_loss_is_alignment_plus_beta_kl_and_reaches_student():
    g = _LinearG()
    s = torch.tensor([[4.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.5, -0.5]])
    t_img = torch.tensor([[1.0, 0.5]])
    total, parts = mekd_loss(g, s, t, t_img, tau_g=2.0, tau=5.0, beta=0.5)
    kl = 25 * _kl(_softmax([0.1, -0.1]), _softmax([0.4, -0.4]))  # centring leaves softmax unchanged
    assert parts["align"] == pytest.approx(1.5)
    assert parts["match"] == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(1.5 + 0.5 * kl, rel=1e-5)
    total.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert g.w.grad is None  # the generator is frozen


def test_mekd_hard_cross_entropy_option():
    g = _LinearG()
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[-0.5, 0.5]])  # centred one-hot of class 1
    _, parts = mekd_loss(g, s, t, torch.zeros(1, 2), tau_g=1.0, beta=1.0, hard_ce=True)
    assert parts["match"] == pytest.approx(-math.log(_softmax([1.0, 0.0])[1]), rel=1e-5)


def test_gan_losses():
    real, fake = torch.tensor([[0.0]]), torch.tensor([[math.log(3.0)]])  # D = 0.5 and 0.75
    expected_d = 0.5 * (-math.log(0.5) - math.log(1 - 0.75))
    assert gan_discriminator_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert gan_generator_loss(fake).item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_information_maximisation_is_per_sample():
    logits = torch.tensor([[0.0], [math.log(3.0)]])  # D = 0.5, 0.75
    conf = torch.tensor([1.0, 0.5])
    expected = -(1.0 * math.log(0.5) + 0.5 * math.log(0.75)) / 2
    assert information_maximisation(logits, conf).item() == pytest.approx(expected, rel=1e-6)
    # the teacher's confidence is a number, never a path for gradients
    conf = torch.tensor([1.0, 0.5], requires_grad=True)
    information_maximisation(logits.requires_grad_(), conf).backward()
    assert conf.grad is None
