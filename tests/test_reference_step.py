"""b2kd's MEKD step computes what the reference step computes, from cached pieces.

Tolerances: losses within 1e-5 relative, student gradients within 1e-5 absolute
(float32; the two paths sum the same terms in a different order).
"""

import copy

import pytest
import torch

from b2kd.blackbox import ResponseKind
from b2kd.config import DistillConfig
from b2kd.methods.mekd import MEKD
from b2kd.models import Generator, build_model, quantize_uint8
from b2kd.reference_step import reference_loss


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_fast_step_equals_reference_step(kind):
    kind = ResponseKind.parse(kind)
    torch.manual_seed(0)
    teacher = build_model("lenet5", 10, 1, 28).eval()
    generator = Generator(10, 28, 1, (16, 8)).eval()
    student_a = build_model("lenet5", 10, 1, 28).train()
    student_b = build_model("lenet5", 10, 1, 28).train()
    student_b.load_state_dict(student_a.state_dict())
    with torch.no_grad():
        images = quantize_uint8(generator(torch.randn(32, 10)))
        responses = kind.apply(torch.softmax(teacher(images), 1))  # what the ledger stores

    cfg = DistillConfig(hard_loss="kl")  # the reference form
    method = MEKD(cfg, kind, generator)
    method.prepare(responses, torch.device("cpu"))
    fast, _ = method.loss(student_a, images, torch.arange(32))
    fast.backward()

    ref_generator = copy.deepcopy(generator)
    ref = reference_loss(student_b, ref_generator, teacher, images, kind, cfg.tau_g, cfg.tau, cfg.beta)
    ref.backward()

    assert fast.item() == pytest.approx(ref.item(), rel=1e-5)
    for (name, pa), (_, pb) in zip(student_a.named_parameters(), student_b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5, rtol=1e-4), name
    # the fast step leaves the frozen generator without gradients; the reference fills them
    assert all(p.grad is None for p in generator.parameters())
    assert all(p.grad is not None for p in ref_generator.parameters())
