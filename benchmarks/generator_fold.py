"""The frozen generator's forward + input-gradient pass, as trained and folded (b2kd.models.fold).

This pass is most of a MEKD step: the student's logits go through the frozen G and back.
Shapes: the demo's generator (widths 64/32, 28 px, 1 channel) and paper-mnist's (128/64,
32 px), batch 128, random weights with BatchNorm statistics set as a trained G has them.
Each variant runs interleaved with the others, after a discarded warm-up repetition; the
median over repetitions is printed. Example:

    .venv/bin/python benchmarks/generator_fold.py --threads 2 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from b2kd.core.runtime import fast_layout, hardware
from b2kd.models import Generator
from b2kd.models.fold import fold_frozen

SHAPES = {"demo (64/32, 28 px)": ((64, 32), 28, 1), "paper-mnist (128/64, 32 px)": ((128, 64), 32, 1)}


def trained_like(widths, size, channels) -> nn.Module:
    torch.manual_seed(0)
    g = Generator(latent_dim=10, image_size=size, channels=channels, widths=widths)
    for m in g.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return g.eval().requires_grad_(False)


def seconds_per_pass(g: nn.Module, batch: int, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        z = torch.randn(batch, 10, requires_grad=True)
        g(z).abs().mean().backward()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{hardware()}, torch {torch.__version__}, batch {args.batch}")
    print("| generator | as trained (ms) | channels-last (ms) | folded + channels-last (ms) | speed-up |")
    print("|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        g = trained_like(*shape)
        variants = {"plain": g, "cl": fast_layout(trained_like(*shape)), "fold": fast_layout(fold_frozen(g))}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for rep in range(args.reps + 1):
            for key, model in variants.items():
                t = seconds_per_pass(model, args.batch, args.iters)
                if rep:  # the first repetition warms up
                    times[key].append(t)
        med = {k: 1000 * statistics.median(v) for k, v in times.items()}
        print(f"| {name} | {med['plain']:.1f} | {med['cl']:.1f} | {med['fold']:.1f} |"
              f" {med['cl'] / med['fold']:.2f}x |")


if __name__ == "__main__":
    main()
