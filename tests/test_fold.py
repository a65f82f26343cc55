"""The folded generator computes the trained generator's function: values and input gradients."""

import copy

import pytest
import torch
from torch import nn

from b2kd.models import Generator
from b2kd.models.fold import fold_frozen, fold_pair, foldable


def _trained_like(dtype=torch.float32) -> Generator:
    """A generator with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    g = Generator(latent_dim=10, image_size=28, channels=1, widths=(16, 8)).to(dtype)
    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return g.eval()


def test_one_pair_equals_upsample_then_conv_in_float64():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    expected = conv(nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    got = fold_pair(conv)(x)
    assert got.shape == expected.shape == (2, 5, 14, 12)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_a_hand_computed_corner():
    """One input pixel, kernel of ones: output (0, 0) sees the upsampled 2x2 block of that pixel."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    conv.weight.data.fill_(1.0)
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0
    out = fold_pair(conv)(x)[0, 0]
    # upsampled: rows/cols 0-1 are 1; a 3x3 box sum at (0,0) covers 4 of them, at (1,1) also 4,
    # at (2,2) only (1,1): 1, at (3,3) none
    assert out[0, 0] == 4 and out[1, 1] == 4 and out[2, 2] == 1 and out[3, 3] == 0
    assert out[0, 2] == 2  # rows 0-1, column 1 only


def test_generator_values_and_input_gradients_float64():
    g = _trained_like(torch.float64)
    folded = fold_frozen(g)
    assert not any(isinstance(m, nn.Upsample) for m in folded.modules())
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in folded.modules()) == 2
    # the BatchNorms after the two folded layers are fused into them; the first one (after fc) stays
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 1
    z = torch.randn(16, 10, dtype=torch.float64, requires_grad=True)
    target = torch.rand(16, 1, 28, 28, dtype=torch.float64)
    a, b = g(z), folded(z)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    ga, = torch.autograd.grad((a - target).square().mean(), z)
    gb, = torch.autograd.grad((folded(z) - target).square().mean(), z)
    assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-14)


def test_float32_close_and_original_untouched():
    g = _trained_like()
    before = copy.deepcopy(g.state_dict())
    folded = fold_frozen(g)
    z = torch.randn(64, 10)
    assert (g(z) - folded(z)).abs().max() < 1e-5
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())
    assert any(isinstance(m, nn.Upsample) for m in g.modules())  # the original keeps its layers
    assert not any(p.requires_grad for p in folded.parameters())
    assert folded.config == g.config  # the pool code reads latent_dim from it


@pytest.mark.parametrize("up, conv", [
    (nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(2, 2, 3, padding=1)),
    (nn.Upsample(scale_factor=3), nn.Conv2d(2, 2, 3, padding=1)),
    (nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 5, padding=2)),
    (nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 3, padding=0)),
    (nn.Upsample(scale_factor=2), nn.Conv2d(2, 2, 3, padding=1, stride=2)),
])
def test_other_pairs_are_left_alone(up, conv):
    assert not foldable(up, conv)
    seq = nn.Sequential(up, conv)
    assert isinstance(fold_frozen(seq)[0], nn.Upsample)
