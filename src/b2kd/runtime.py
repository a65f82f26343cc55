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
        from b2kd.config import ConfigError

        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(device)


def hardware() -> str:
    """One line naming where a result was measured."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os
    import platform

    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
