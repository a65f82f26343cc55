"""Process-wide settings a stage needs before it starts: seeds, threads, device."""

from __future__ import annotations

import random

import numpy as np
import torch


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
    """Channels-last weights: the same numbers, but oneDNN picks faster convolutions.

    Measured on the 2-core CPU (torch 2.13, batch 128): the 64/32 generator's
    forward+backward at 28 px 1.8x faster, the 128/64 one at 32 px about 2x,
    ResNet8 training at 32 px 1.5x. State dicts load into either layout.
    """
    return module.to(memory_format=torch.channels_last)
