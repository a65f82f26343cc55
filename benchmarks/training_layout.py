"""Training steps in the default layout against channels-last weights (runtime.fast_layout).

The teacher's and the GAN's training steps at the demo's sizes (cnn_small at batch 128; the
64/32 generator and the spectrally normalised discriminator at batch 64, 28 px), interleaved,
several warm repetitions each; prints the median milliseconds per step and the ratio. Weights
are random (the time of a step does not depend on them). Example, on the demo's 2 threads:

    .venv/bin/python benchmarks/training_layout.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from b2kd.core.runtime import fast_layout, hardware
from b2kd.deprivatize.losses import gan_discriminator_loss, gan_generator_loss
from b2kd.models import Discriminator, Generator, build_model


def teacher_step(layout):
    model = layout(build_model("cnn_small", 10, 1, 28))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def gan_step(layout):
    gen = layout(Generator(10, 28, 1, (64, 32)))
    disc = layout(Discriminator(28, 1, spectral_norm=True, dropout=0.0))
    opt_g = torch.optim.Adam(gen.parameters(), lr=8e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=3.2e-3, betas=(0.5, 0.999))
    real = torch.rand(64, 1, 28, 28) * 2 - 1

    def step():  # as deprivatize.run.train_epoch, without the teacher's query
        fake = gen(torch.randn(64, 10))
        d_loss = gan_discriminator_loss(disc(real), disc(fake.detach()))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = gan_generator_loss(disc(fake))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
    return step


def median_ms(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repetition")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions per layout")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{hardware()}, torch {torch.__version__}")
    print("| step | default, ms | channels-last, ms | speed-up |\n|---|---|---|---|")
    cases = (("teacher (cnn_small, batch 128)", teacher_step),
             ("GAN (G 64/32 + SN D, batch 64)", gan_step))
    for name, make in cases:
        steps = {"default": make(lambda m: m), "channels-last": make(fast_layout)}
        for step in steps.values():
            for _ in range(3):  # warm-up
                step()
        times = {key: [] for key in steps}
        for _ in range(args.reps):
            for key, step in steps.items():
                times[key].append(median_ms(step, args.steps))
        base, fast = (statistics.median(times[key]) for key in ("default", "channels-last"))
        print(f"| {name} | {base:.1f} | {fast:.1f} | {base / fast:.2f}x |")


if __name__ == "__main__":
    main()
