"""A frozen generator made cheaper without changing its function: fewer, equivalent layers.

The generator doubles its resolution twice with nearest-neighbour upsampling followed by
a 3x3 convolution (padding 1). That pair is linear in its input and equals one stride-2
transposed convolution with a 4x4 kernel (padding 1): output row ``2i`` reads input rows
``i - 1`` and ``i`` with kernel rows ``k0`` and ``k1 + k2``, output row ``2i + 1`` reads rows
``i`` and ``i + 1`` with ``k0 + k1`` and ``k2``, and the same holds for columns. The
transposed convolution computes each output from 2x2 input pixels instead of 3x3
upsampled ones: 16 multiply-adds per input pixel and channel pair instead of 36, no
upsampled tensor in memory, and the same values up to floating-point rounding (equal to
1e-12 in float64, ``tests/test_fold.py``). A BatchNorm in eval mode right after a
convolution is an affine map per channel and goes into that convolution's weights
(``torch.nn.utils.fusion.fuse_conv_bn_eval``), which removes its forward and backward.

MEKD pushes every training step's student logits through the frozen generator and
back, so this is where its step spends its time (docs/results.md, "Speed"). Only frozen use
is offered: the folded kernels are computed once from the trained weights, and a
deprivatization GAN keeps training its own layers unchanged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

#: Row ``p`` of the transposed kernel is the sum of the 3x3 kernel's rows ``r`` with a 1 here.
_FOLD = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def foldable(up: nn.Module, conv: nn.Module) -> bool:
    """Whether ``up`` then ``conv`` is nearest x2 upsampling and a plain 3x3 same-size convolution."""
    return (
        isinstance(up, nn.Upsample)
        and up.mode == "nearest"
        and up.size is None
        and up.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0))
        and type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


@torch.no_grad()
def fold_pair(conv: nn.Conv2d) -> nn.ConvTranspose2d:
    """The stride-2 transposed convolution equal to nearest x2 upsampling followed by ``conv``."""
    weight = conv.weight
    fold = _FOLD.to(weight)
    folded = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, 4, stride=2, padding=1,
                                bias=conv.bias is not None, dtype=weight.dtype, device=weight.device)
    # conv weight (out, in, r, c) -> transposed-conv weight (in, out, p, q)
    folded.weight.copy_(torch.einsum("pr,oirc,qc->iopq", fold, weight, fold))
    if conv.bias is not None:
        folded.bias.copy_(conv.bias)
    return folded.train(conv.training)


def _fold_sequence(layers: list[nn.Module]) -> list[nn.Module]:
    """The layers of one ``nn.Sequential`` (in eval mode), folded and fused; same function."""
    kept: list[nn.Module] = []
    i = 0
    while i < len(layers):
        if i + 1 < len(layers) and foldable(layers[i], layers[i + 1]):
            kept.append(fold_pair(layers[i + 1]))
            i += 2
        else:
            kept.append(layers[i])
            i += 1
    fused: list[nn.Module] = []
    for layer in kept:
        previous = fused[-1] if fused else None
        if type(layer) is nn.BatchNorm2d and layer.track_running_stats and type(previous) in (
                nn.Conv2d, nn.ConvTranspose2d):
            fused[-1] = fuse_conv_bn_eval(previous, layer, transpose=type(previous) is nn.ConvTranspose2d)
        else:
            fused.append(layer)
    return fused


def fold_frozen(generator: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of ``generator`` whose ``nn.Sequential`` blocks have every
    upsample + 3x3 conv pair folded into one transposed convolution and every BatchNorm that
    follows a convolution fused into it; the original is untouched."""
    frozen = copy.deepcopy(generator).eval()
    for module in list(frozen.modules()):
        if isinstance(module, nn.Sequential):
            layers = list(module)
            folded = _fold_sequence(layers)
            if len(folded) < len(layers):
                module._modules.clear()
                for j, layer in enumerate(folded):
                    module.add_module(str(j), layer)
    return frozen.requires_grad_(False)
