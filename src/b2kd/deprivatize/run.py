"""Step one of MEKD: train a GAN on the private images so only synthetic images leave the edge.

Generator loss = non-saturating GAN loss + alpha * L_IM, where L_IM weights
log D(G(z)) of the queried samples by the teacher's top probability on them
(spec section 2). The teacher is queried on a schedule, a sub-batch every
k-th step, and every query is paid through the ledger against this stage's
own budget.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from b2kd.blackbox import to_probs
from b2kd.core import distributed
from b2kd.core.checkpoint import atomic_save, load_resumed, module_checkpoint, read, save_generator
from b2kd.core.config import DeprivatizeConfig
from b2kd.core.engine import epoch_generator
from b2kd.core.grid import save_grid
from b2kd.core.runtime import fast_layout
from b2kd.deprivatize.losses import (
    gan_discriminator_loss,
    gan_generator_loss,
    information_maximisation,
)
from b2kd.edge import BlackBoxTeacher
from b2kd.models import Discriminator, Generator, from_uint8, quantize_uint8


@dataclass
class GAN:
    """G and D, their Adam optimisers, and the modules that train them (DDP copies under torchrun)."""

    gen: Generator
    disc: Discriminator
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    g_train: torch.nn.Module
    d_train: torch.nn.Module

    @classmethod
    def build(cls, cfg: DeprivatizeConfig, teacher: BlackBoxTeacher, seed: int, device: torch.device,
              parallel=None) -> GAN:
        channels, size, _ = teacher.image_shape
        torch.manual_seed(seed)
        gen = fast_layout(Generator(teacher.num_classes, size, channels, tuple(cfg.widths)).to(device))
        disc = Discriminator(size, channels, spectral_norm=cfg.spectral_norm, dropout=cfg.d_dropout)
        disc = fast_layout(disc.to(device))
        opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.d_lr or cfg.lr, betas=tuple(cfg.betas))
        sync_bn = parallel is not None and parallel.sync_batchnorm
        return cls(gen, disc, opt_g, opt_d, distributed.wrap(gen, device, sync_bn),
                   distributed.wrap(disc, device, sync_bn))

    def resume(self, state_path: Path, log) -> int:
        """The epoch to start at: after the last one ``state_path`` holds (0 without one)."""
        state = distributed.checkpoint_from_rank0(state_path)  # under torchrun: rank 0's ({} if none)
        if state is None and state_path.is_file():
            state = read(state_path, "gan_state")
        if not state:
            return 0
        load_resumed(self.gen, state["generator"], state_path, "generator")
        load_resumed(self.disc, state["discriminator"], state_path, "discriminator")
        load_resumed(self.opt_g, state["opt_g"], state_path, "generator's optimiser state")
        load_resumed(self.opt_d, state["opt_d"], state_path, "discriminator's optimiser state")
        start_epoch = state["epoch"] + 1
        log(f"resuming deprivatization at epoch {start_epoch + 1}")
        return start_epoch

    def save_state(self, epoch: int, state_path: Path) -> None:
        atomic_save({"kind": "gan_state", "generator": self.gen.state_dict(),
                     "discriminator": self.disc.state_dict(), "opt_g": self.opt_g.state_dict(),
                     "opt_d": self.opt_d.state_dict(), "epoch": epoch}, state_path)


def deprivatize(
    cfg: DeprivatizeConfig,
    private: torch.Tensor,
    teacher: BlackBoxTeacher,
    out: str | Path,
    seed: int,
    device: torch.device,
    on_step=None,
    log=print,
    parallel=None,
) -> dict:
    """Train G and D on ``private`` (uint8, labels never seen); writes generator.pt and a sample grid.

    Under torchrun (``parallel``: the config's ``distributed`` section) G and D are trained
    data-parallel on shards of each global batch; rank 0 alone queries, on its own fakes, and
    its information-maximisation term is weighted by the world size so the ranks' average
    gradient carries it as one process would.
    """
    out = Path(out)
    if tuple(private.shape[1:]) != teacher.image_shape:
        raise ValueError(
            f"private images are {tuple(private.shape[1:])} but the teacher takes {teacher.image_shape}"
        )
    gan = GAN.build(cfg, teacher, seed, device, parallel)
    state_path = out / "checkpoints" / "gan_latest.pt"
    start_epoch = gan.resume(state_path, log)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        means = train_epoch(gan, cfg, private, teacher, epoch, seed, device, on_step)
        if not distributed.is_main():  # rank 0 writes the state and the metrics
            continue
        gan.save_state(epoch, state_path)
        record = {"epoch": epoch, **means, "queries": teacher.spent, "seconds": time.perf_counter() - t0}
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        log(f"deprivatize epoch {epoch + 1}/{cfg.epochs}: D {record['d']:.3f} G {record['g']:.3f}"
            f" queries {teacher.spent} ({record['seconds']:.0f}s)")
    if not distributed.is_main():
        return {"role": "generator", "epochs": cfg.epochs}
    return save_generator_and_samples(gan, cfg, teacher, out, seed, device)


def train_epoch(gan: GAN, cfg: DeprivatizeConfig, private: torch.Tensor, teacher: BlackBoxTeacher,
                epoch: int, seed: int, device: torch.device, on_step=None) -> dict[str, float]:
    """One epoch of D and G steps over the private images; the mean losses over the ranks."""
    batch = cfg.batch_size * distributed.world_size()  # the effective batch: per rank x world size
    steps_per_epoch = math.ceil(len(private) / batch)
    rng = epoch_generator(seed, epoch)
    perm = torch.randperm(len(private), generator=rng)
    own = distributed.rank_generator(rng, seed, epoch)  # this rank's noise: rng in one process
    sums = {"d": 0.0, "g": 0.0, "im": 0.0}
    gan.gen.train()
    gan.disc.train()
    for step in range(steps_per_epoch):
        idx, share = distributed.my_indices(perm[step * batch : (step + 1) * batch])
        real = from_uint8(private[idx]).to(device)
        z = torch.randn(len(idx), teacher.num_classes, generator=own).to(device)
        fake = gan.g_train(z)

        d_loss = gan_discriminator_loss(gan.d_train(real), gan.d_train(fake.detach()))
        gan.opt_d.zero_grad(set_to_none=True)
        (d_loss if share == 1.0 else d_loss * share).backward()
        gan.opt_d.step()

        fake_logits = gan.d_train(fake)
        g_loss = gan_generator_loss(fake_logits)
        if (epoch * steps_per_epoch + step) % cfg.query_every == 0:
            im = paid_information_term(cfg, teacher, fake, fake_logits, len(idx), device, on_step)
            if im is not None:
                g_loss = g_loss + cfg.alpha * distributed.world_size() * im
                sums["im"] += im.item() * distributed.world_size()  # averaged over the ranks below
        gan.opt_g.zero_grad(set_to_none=True)
        (g_loss if share == 1.0 else g_loss * share).backward()
        gan.opt_g.step()
        sums["d"] += d_loss.item()
        sums["g"] += g_loss.item()
    return distributed.mean_over_ranks({k: v / steps_per_epoch for k, v in sums.items()})


def paid_information_term(cfg: DeprivatizeConfig, teacher: BlackBoxTeacher, fake: torch.Tensor,
                          fake_logits: torch.Tensor, batch: int, device: torch.device,
                          on_step=None) -> torch.Tensor | None:
    """L_IM on a sub-batch of this step's fakes, paid for with one query (rank 0 alone, within the
    budget); None when this rank does not query or the budget cannot pay for the sub-batch."""
    m = min(cfg.query_batch, batch)
    if not distributed.is_main() or (teacher.remaining is not None and teacher.remaining < m):
        return None
    sent = quantize_uint8(fake[:m].detach()).cpu()
    api = teacher.query(sent)
    probs = to_probs(api, teacher.kind)
    confidence = probs.max(1).values.to(device)
    im = information_maximisation(fake_logits[:m], confidence)
    if on_step is not None:
        on_step(teacher.spent)
    return im


def save_generator_and_samples(gan: GAN, cfg: DeprivatizeConfig, teacher: BlackBoxTeacher, out: Path,
                               seed: int, device: torch.device) -> dict:
    """generator.pt, a grid of 64 samples, and D (for the balanced pool's realism filter)."""
    gan.gen.eval()
    with torch.no_grad():
        z = torch.randn(64, teacher.num_classes, generator=torch.Generator().manual_seed(seed))
        samples = quantize_uint8(gan.gen(z.to(device))).cpu()
    grid = save_grid(samples, out / "images" / "generator_samples.png", nrow=8)
    meta = {"role": "generator", "image_shape": list(teacher.image_shape),
            "num_classes": teacher.num_classes, "epochs": cfg.epochs, "queries": teacher.spent}
    save_generator(gan.gen.cpu(), out / "generator.pt", **meta)
    # D of the last epoch, for the balanced pool's realism filter (b2kd.pool.realism)
    atomic_save(module_checkpoint("discriminator", gan.disc.cpu(), epoch=cfg.epochs - 1), out / "discriminator.pt")
    return {**meta, "generator": str(out / "generator.pt"), "samples": str(grid)}
