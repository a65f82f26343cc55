import math

import pytest
import torch

from b2kd.blackbox import ResponseKind, ResponseKindError, centre, teacher_logits, to_probs, top1


def test_parse_kinds():
    assert str(ResponseKind.parse("soft")) == "soft"
    assert ResponseKind.parse("topk:3") == ResponseKind("topk", 3)
    assert ResponseKind.parse("rounded:2").param == 2
    assert ResponseKind.parse("hard").is_hard
    for bad in ("probs", "topk:0", "topk", "rounded:x", ""):
        with pytest.raises(ResponseKindError):
            ResponseKind.parse(bad)


def test_apply_each_kind():
    p = torch.tensor([[0.66, 0.24, 0.10]])
    assert torch.equal(ResponseKind.parse("soft").apply(p), p)
    assert torch.equal(ResponseKind.parse("hard").apply(p), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(ResponseKind.parse("rounded:1").apply(p), torch.tensor([[0.7, 0.2, 0.1]]))
    top = ResponseKind.parse("topk:2").apply(p)
    assert top[0, 0] == pytest.approx(0.66) and top[0, 1] == pytest.approx(0.24)
    assert math.isnan(top[0, 2])


def test_wire_bytes():
    assert ResponseKind.parse("soft").wire_bytes(10) == 40
    assert ResponseKind.parse("hard").wire_bytes(10) == 4
    assert ResponseKind.parse("topk:3").wire_bytes(10) == 24


def test_to_probs_fills_unknown_mass_evenly():
    api = torch.tensor([[0.6, math.nan, 0.3, math.nan]])
    assert torch.allclose(to_probs(api, "topk:2"), torch.tensor([[0.6, 0.05, 0.3, 0.05]]))
    rounded = torch.tensor([[0.5, 0.3, 0.3]])  # rounding can overshoot 1
    assert torch.allclose(to_probs(rounded, "rounded:1"), rounded / 1.1)


def test_teacher_logits_soft_are_centred_log_probs():
    api = torch.tensor([[0.5, 0.25, 0.25]])
    mean = (math.log(0.5) + 2 * math.log(0.25)) / 3
    expected = torch.tensor([[math.log(0.5) - mean, math.log(0.25) - mean, math.log(0.25) - mean]])
    assert torch.allclose(teacher_logits(api, "soft"), expected, atol=1e-6)
    assert teacher_logits(api, "soft").sum().abs() < 1e-6


def test_teacher_logits_hard_are_centred_one_hot():
    api = torch.tensor([[0.0, 1.0, 0.0]])
    assert torch.allclose(teacher_logits(api, "hard"), torch.tensor([[-1 / 3, 2 / 3, -1 / 3]]))


def test_teacher_logits_clamp_zero_probabilities():
    t = teacher_logits(torch.tensor([[1.0, 0.0]]), "soft")
    assert torch.isfinite(t).all()
    assert t[0, 0] - t[0, 1] == pytest.approx(-math.log(1e-6), rel=1e-5)


def test_centre_and_top1():
    assert torch.equal(centre(torch.tensor([[1.0, 3.0]])), torch.tensor([[-1.0, 1.0]]))
    assert top1(torch.tensor([[math.nan, 0.2, 0.7]])).item() == 2
