"""The baseline losses (KD, ML, DKD, AL) against values computed by hand with the math module."""

import math

import pytest
import torch

from b2kd.blackbox import ResponseKind
from b2kd.core.config import DistillConfig
from b2kd.distill.losses import (
    al_discriminator_loss,
    al_student_adversarial,
    dkd_loss,
    dkd_terms,
    kd_kl,
    logit_matching,
)
from b2kd.distill.methods.al import AL


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP hand-offs that dominate on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# --- KD ----------------------------------------------------------------------------------------

T2 = [[2.0, -1.0, 0.5], [0.0, 1.5, -0.5]]
S2 = [[0.3, 0.1, -0.2], [1.0, -1.0, 0.0]]


@pytest.mark.parametrize("tau", [1.0, 5.0])
def test_kd_at_two_temperatures_is_tau_squared_kl(tau):
    expected = (
        sum(
            tau**2 * _kl(_softmax([x / tau for x in t]), _softmax([x / tau for x in s]))
            for t, s in zip(T2, S2)
        )
        / 2
    )
    assert kd_kl(torch.tensor(S2), torch.tensor(T2), tau).item() == pytest.approx(
        expected, rel=1e-5
    )


# --- ML ----------------------------------------------------------------------------------------


def test_logit_matching_hand_value():
    log_p = [
        [math.log(0.5), math.log(0.25), math.log(0.25)],
        [math.log(0.1), math.log(0.2), math.log(0.7)],
    ]
    s = [[1.0, 0.0, -1.0], [0.5, 0.5, -1.0]]
    sq = 0.0
    for lp, sr in zip(log_p, s):
        mean = sum(lp) / 3
        sq += sum((a - (b - mean)) ** 2 for a, b in zip(sr, lp))
    got = logit_matching(torch.tensor(s), torch.tensor(log_p))
    assert got.item() == pytest.approx(sq / 6, rel=1e-5)


def test_logit_matching_ignores_a_constant_on_teacher_rows():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    shift = torch.tensor([[3.0], [-7.0]])
    assert logit_matching(s, t + shift).item() == pytest.approx(
        logit_matching(s, t).item(), rel=1e-6
    )
    assert logit_matching(t - t.mean(1, keepdim=True), t + shift).item() == pytest.approx(
        0.0, abs=1e-10
    )


# --- DKD ---------------------------------------------------------------------------------------

T1, S1 = [2.0, 0.0, -1.0], [0.5, 1.0, 0.0]  # the teacher's top-1 is class 0


def _dkd_by_hand(t, s, tau):
    pt, ps = _softmax([x / tau for x in t]), _softmax([x / tau for x in s])
    target = max(range(3), key=lambda k: t[k])
    tckd = _kl([pt[target], 1 - pt[target]], [ps[target], 1 - ps[target]])
    rest = [k for k in range(3) if k != target]
    nckd = _kl(_softmax([t[k] / tau for k in rest]), _softmax([s[k] / tau for k in rest]))
    return tau**2 * tckd, tau**2 * nckd


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_dkd_target_and_non_target_terms_by_hand(tau):
    tckd, nckd = dkd_terms(torch.tensor([S1]), torch.tensor([T1]), tau)
    want_t, want_n = _dkd_by_hand(T1, S1, tau)
    assert tckd.item() == pytest.approx(want_t, rel=1e-5)
    assert nckd.item() == pytest.approx(want_n, rel=1e-5)


def test_dkd_terms_recompose_kd():
    """KL = TCKD + (1 - p_target of the teacher) * NCKD (the DKD paper's identity)."""
    tau = 2.0
    tckd, nckd = dkd_terms(torch.tensor([S1]), torch.tensor([T1]), tau)
    p_rest = 1 - _softmax([x / tau for x in T1])[0]
    kd = kd_kl(torch.tensor([S1]), torch.tensor([T1]), tau)
    assert (tckd + p_rest * nckd).item() == pytest.approx(kd.item(), rel=1e-5)


def test_dkd_target_is_the_teacher_top1():
    """Moving the teacher's top-1 to another class changes which probability TCKD reads."""
    t = [0.0, 2.0, -1.0]
    tckd, _ = dkd_terms(torch.tensor([S1]), torch.tensor([t]), 1.0)
    assert tckd.item() == pytest.approx(_dkd_by_hand(t, S1, 1.0)[0], rel=1e-5)


def test_dkd_alpha_and_beta_weight_the_terms():
    s, t = torch.tensor([S1]), torch.tensor([T1])
    tckd, nckd = _dkd_by_hand(T1, S1, 5.0)
    for alpha, beta in [(1.0, 8.0), (0.5, 0.0), (0.0, 2.0)]:
        total, parts = dkd_loss(s, t, 5.0, alpha, beta)
        assert total.item() == pytest.approx(alpha * tckd + beta * nckd, rel=1e-5)
        assert parts["tckd"] == pytest.approx(tckd, rel=1e-5)
        assert parts["nckd"] == pytest.approx(nckd, rel=1e-5)


def test_dkd_is_zero_when_student_matches():
    t = torch.randn(4, 10)
    total, _ = dkd_loss(t + 3.0, t, 5.0, 1.0, 8.0)
    assert total.item() == pytest.approx(0.0, abs=1e-5)


# --- AL ----------------------------------------------------------------------------------------


def test_al_losses_by_hand():
    """With a linear D(x) = w.x + b the two BCEs are softplus expressions."""
    d = torch.nn.Linear(2, 1)
    with torch.no_grad():
        d.weight.copy_(torch.tensor([[1.0, -1.0]]))
        d.bias.fill_(0.5)
    t, s = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    dt, ds = 1.0 + 0.5, -2.0 + 0.5

    def softplus(x):
        return math.log1p(math.exp(x))

    assert al_discriminator_loss(d, t, s).item() == pytest.approx(
        0.5 * (softplus(-dt) + softplus(ds)), rel=1e-6
    )
    assert al_student_adversarial(d, s).item() == pytest.approx(softplus(-ds), rel=1e-6)


class _FixedLogits(torch.nn.Module):
    """A 'student' whose logits are a parameter, whatever the images."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, images):
        return self.logits


def _al_setup(seed=0):
    torch.manual_seed(seed)
    probs = torch.softmax(torch.randn(8, 5) * 2, dim=1)
    method = AL(DistillConfig(al_lr=1e-2), ResponseKind.parse("soft"))
    method.prepare(probs, torch.device("cpu"))
    return method, _FixedLogits(torch.randn(8, 5))


def _scores(method, student):
    """D's scores on the teacher's and on the (centred) student's logits, per sample."""
    with torch.no_grad():
        s = student.logits - student.logits.mean(1, keepdim=True)
        return method.discriminator(method.t_logits).squeeze(1), method.discriminator(s).squeeze(1)


def test_al_loss_takes_one_discriminator_step_towards_teacher_one_student_zero():
    """One ``loss()`` call: D's loss on the batch falls and D(teacher) - D(student) widens.

    (Adam's first step moves every weight by about lr, shared ones too, so the two
    scores need not move in opposite directions after a single step; the gap must widen.)
    """
    method, student = _al_setup()
    t0, s0 = _scores(method, student)
    d_loss_before = al_discriminator_loss(
        method.discriminator, method.t_logits, student.logits - student.logits.mean(1, keepdim=True)
    )
    loss, parts = method.loss(student, torch.zeros(8, 1, 4, 4), torch.arange(8))
    t1, s1 = _scores(method, student)
    assert parts["disc"] == pytest.approx(d_loss_before.item(), rel=1e-5)
    d_loss_after = al_discriminator_loss(
        method.discriminator, method.t_logits, student.logits - student.logits.mean(1, keepdim=True)
    )
    assert d_loss_after.item() < d_loss_before.item()
    assert (t1.mean() - s1.mean()).item() > (t0.mean() - s0.mean()).item()
    assert set(parts) == {"kd", "adv", "disc"} and all(math.isfinite(v) for v in parts.values())
    # the student's backward reaches the student only; the discriminator's grads stay untouched
    grads = [p.grad.clone() for p in method.discriminator.parameters()]
    loss.backward()
    assert student.logits.grad is not None and student.logits.grad.abs().sum() > 0
    assert all(torch.equal(p.grad, g) for p, g in zip(method.discriminator.parameters(), grads))


def test_al_discriminator_steps_label_teacher_one_and_student_zero():
    """Repeated steps, student held still: D(teacher) rises, D(student) falls, across zero."""
    method, student = _al_setup()
    t0, s0 = _scores(method, student)
    for _ in range(30):
        method.loss(student, torch.zeros(8, 1, 4, 4), torch.arange(8))
    t1, s1 = _scores(method, student)
    assert t1.mean() > t0.mean() and s1.mean() < s0.mean()
    assert (t1 > 0).all() and (s1 < 0).all()


def test_al_student_gradient_raises_the_discriminator_score():
    torch.manual_seed(1)
    d = torch.nn.Sequential(torch.nn.Linear(5, 64), torch.nn.LeakyReLU(0.2), torch.nn.Linear(64, 1))
    s = torch.randn(8, 5, requires_grad=True)
    al_student_adversarial(d, s).backward()
    with torch.no_grad():
        before = d(s).mean().item()
        after = d(s - 0.1 * s.grad).mean().item()
    assert after > before
