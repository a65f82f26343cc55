"""b2kd's MEKD step computes what the reference's equations compute.

``b2kd.distill.reference_step`` writes the reference's loss out with plain torch
operations (none of b2kd's loss or response code), so these tests check
b2kd's formulas (centred targets, the generator alignment, tau^2 KL) as well
as its caching of G(t / tau_g).

Tolerances: losses and each term within 1e-5 relative, student gradients within
1e-5 absolute (float32; the two paths sum the same terms in a different order).
"""

import copy

import pytest
import torch

from b2kd.blackbox import ResponseKind
from b2kd.core.config import DistillConfig
from b2kd.distill.methods.mekd import MEKD
from b2kd.distill.reference_step import reference_loss, reference_step, reference_terms
from b2kd.models import Generator, build_model


def _sharpen(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    """Scale every weight: a freshly initialised LeNet-5 answers almost uniformly (logits within
    0.06 of each other), where a wrong temperature or centring would hardly change the loss."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(factor)
    return model


def _setup(kind: ResponseKind, n: int = 32):
    """Teacher logits spread ~2.5 (mean top probability 0.64), student's ~0.8, random images."""
    torch.manual_seed(0)
    teacher = _sharpen(build_model("lenet5", 10, 1, 28), 2.5).eval()
    generator = Generator(10, 28, 1, (16, 8)).eval()
    student_a = _sharpen(build_model("lenet5", 10, 1, 28), 2.0).train()
    student_b = build_model("lenet5", 10, 1, 28).train()
    student_b.load_state_dict(student_a.state_dict())
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        responses = kind.apply(torch.softmax(teacher(images), 1))  # what the ledger stores
    return teacher, generator, student_a, student_b, images, responses


@pytest.mark.parametrize("kind", ["soft", "hard"])
@pytest.mark.parametrize("tau_g, tau, beta", [(5.0, 5.0, 1.0), (2.0, 3.0, 0.5)])
def test_fast_step_equals_reference_step(kind, tau_g, tau, beta):
    kind = ResponseKind.parse(kind)
    teacher, generator, student_a, student_b, images, responses = _setup(kind)

    cfg = DistillConfig(hard_loss="kl", tau_g=tau_g, tau=tau, beta=beta)  # the reference form
    method = MEKD(cfg, kind, generator)
    method.prepare(responses, torch.device("cpu"))
    fast, parts = method.loss(student_a, images, torch.arange(len(images)))
    fast.backward()

    ref_generator = copy.deepcopy(generator)
    align, match = reference_terms(student_b, ref_generator, teacher, images, kind, tau_g, tau)
    ref = align + beta * match
    ref.backward()

    assert parts["align"] == pytest.approx(align.item(), rel=1e-5)
    assert parts["match"] == pytest.approx(match.item(), rel=1e-5)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)
    for (name, pa), (_, pb) in zip(student_a.named_parameters(), student_b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4), name
    # the fast step leaves the frozen generator without gradients; the reference fills them
    # (through G(s / tau_g) only: its G(t / tau_g) runs under no-grad)
    assert all(p.grad is None for p in generator.parameters())
    assert all(p.grad is not None for p in ref_generator.parameters())


def test_the_comparison_tells_formulas_apart():
    """The check above is not vacuous: b2kd with another tau gives another loss."""
    kind = ResponseKind.parse("soft")
    teacher, generator, student_a, student_b, images, responses = _setup(kind)
    method = MEKD(DistillConfig(tau=4.0), kind, generator)
    method.prepare(responses, torch.device("cpu"))
    fast, _ = method.loss(student_a, images, torch.arange(len(images)))
    ref = reference_loss(student_b, copy.deepcopy(generator), teacher, images, kind, tau=5.0)
    assert fast.item() != pytest.approx(ref.item(), rel=1e-3)


def test_hard_targets_are_one_hot_minus_one_over_k():
    """For a hard answer the KL term is the one-hot's, centred: checked by hand on one row."""
    teacher = torch.nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[0.0], [2.0], [1.0]]))  # top class 1 for x > 0
    student = torch.nn.Linear(1, 3, bias=False)
    with torch.no_grad():
        student.weight.zero_()  # uniform student
    generator = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        generator.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    x = torch.ones(1, 1)
    align, match = reference_terms(student, generator, teacher, x, "hard", tau_g=1.0, tau=1.0)
    # t = (-1/3, 2/3, -1/3), s = 0: G(s) = (0, 0), G(t) = (-1/3, 2/3) -> mean |.| = 1/2
    assert align.item() == pytest.approx(0.5, rel=1e-6)
    # KL(softmax(t) || uniform) = sum p log(3 p), p = softmax(-1/3, 2/3, -1/3)
    p = torch.softmax(torch.tensor([-1 / 3, 2 / 3, -1 / 3]), 0)
    assert match.item() == pytest.approx(float((p * torch.log(3 * p)).sum()), rel=1e-6)


def test_reference_step_trains_and_refuses_other_kinds():
    kind = ResponseKind.parse("soft")
    teacher, generator, student, _, images, _ = _setup(kind, 8)
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    before = [p.detach().clone() for p in student.parameters()]
    loss = reference_step(student, generator, teacher, opt, 8, kind)
    assert loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    with pytest.raises(ValueError, match="soft and hard"):
        reference_loss(student, generator, teacher, images, ResponseKind.parse("topk:3"))


def test_hard_answers_generator_targets_are_the_centred_one_hot():
    """Hard answers: MEKD's teacher logits are one-hot - 1/K (the spec's form), written out by hand
    here, and G(t / tau_g) is drawn from them."""
    kind = ResponseKind.parse("hard")
    _, generator, _, _, _, responses = _setup(kind)
    labels = responses.float().argmax(1)
    method = MEKD(DistillConfig(tau_g=5.0), kind, generator)
    method.prepare(responses, torch.device("cpu"))
    expected = torch.nn.functional.one_hot(labels, 10).float() - 0.1
    assert torch.allclose(method.t_logits, expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(method.t_images, generator(expected / 5.0), atol=1e-5)
