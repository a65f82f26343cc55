"""Process-wide settings a stage needs before it starts: seeds, threads, device, the torchrun
group (:func:`prepare_run`), and the last check before its first query (:func:`start_run`)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from b2kd.core import distributed
from b2kd.core.config import Config, save_config
from b2kd.core.run_dir import check_same_run, check_writable, fingerprints, record_run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def setup(seed: int, threads: int | None = None, device: str = "cpu") -> torch.device:
    """Seed every generator, fix the thread count, and resolve the device."""
    seed_everything(seed)
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from b2kd.core.config import ConfigError

        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(device)


def hardware() -> str:
    """One line naming where a result was measured."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os
    import platform

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def fast_layout(module: torch.nn.Module) -> torch.nn.Module:
    """Channels-last weights: the same function, but oneDNN picks faster convolutions.

    Used for every model that trains or runs convolutions in a loop: the teacher's and the GAN's
    training, the student, and the frozen generator of MEKD's alignment. Measured on the 2-core
    CPU (torch 2.13): the frozen 64/32 generator's forward+backward at 28 px 1.8x faster, the
    128/64 one at 32 px about 2x, ResNet8 training at 32 px 1.5x; the teacher's and the GAN's
    training steps in ``benchmarks/training_layout.py``. Results match the default layout up
    to float rounding, which does change a trained model's last digits. State dicts load into
    either layout.
    """
    return module.to(memory_format=torch.channels_last)


def prepare_run(cfg: Config, out: str | Path, stage: str | None = None) -> tuple[Path, torch.device]:
    """Seed, set threads and device, and check that ``out`` can be written (one line if not).

    A stage (teacher, deprivatize, distill) writes nothing yet: it checks what it needs, then
    :func:`start_run` records it just before its first query or epoch, so a refused run leaves
    no config.yaml describing a run it did not make. Without a stage (``b2kd serve``) the
    directory is created and the config recorded at once.
    Under torchrun this process joins the job (b2kd.core.distributed) and only rank 0 writes.
    """
    device = distributed.init(cfg.distributed, setup(cfg.seed, cfg.threads, cfg.device))
    out = Path(out)
    check_writable(out)
    if stage is None and distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    return out, device


def start_run(cfg: Config, out: Path, stage: str, inputs: dict[str, str | None]) -> None:
    """The last check before a stage's first query or epoch: OUT holds no run made with other
    settings or other input checkpoints (b2kd.core.run_dir); then rank 0 records this one."""
    prints = fingerprints(inputs)
    check_same_run(cfg, out, stage, prints)
    if distributed.is_main():
        record_run(cfg, out, prints)
