"""Data-parallel training under ``torchrun``: one process per device, every query paid by rank 0.

``torchrun --nproc_per_node=N -m b2kd distill ...`` starts N copies of one command
(``--nnodes`` and a rendezvous endpoint spread them over machines). Each joins a
``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs) and then:

- rank 0 alone opens the teacher (:func:`b2kd.edge.connect.teacher_on_rank0`), owns the
  ledger and pays for the pool (with the run's one budget and cache); the other ranks
  receive the images and answers from it by broadcast and never send a query;
- every rank trains a ``DistributedDataParallel`` copy of the model on its part of each
  global batch: the epoch's seeded permutation is the same on every rank and rank ``r``
  of ``W`` takes positions ``r, r + W, ...`` of each batch of ``W x batch_size`` pool
  indices, so the ranks together see exactly the batches one process would see with
  ``batch_size x W``; gradients are all-reduced (averaged, each rank's mean loss weighted
  by its share, so an uneven last batch still gives the global mean);
- only rank 0 writes checkpoints, metrics and reports; a resumed run reads ``latest.pt``
  on rank 0 and broadcasts it, so other nodes need no shared file system;
- every collective waits at most ``distributed.timeout_s``; a rank that fails or dies
  stops the others (torchrun ends the job, and a rank whose peer vanished says so).

Outside torchrun (no ``WORLD_SIZE`` above 1) every helper here returns its input
unchanged, so a single process behaves exactly as it always did.
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from b2kd.core.config import ConfigError

#: Elements per broadcast message when the pool is sent to the other ranks (64 MiB of uint8).
CHUNK = 64 * 2**20


class PeerFailed(Exception):
    """Another rank of this torchrun job failed (its own message says why) or stopped answering."""


def launched() -> bool:
    """Whether torchrun (or any env:// launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one that queries the teacher and writes files (True in a single process)."""
    return rank() == 0


def init(settings, device: torch.device) -> torch.device:
    """Join the process group when launched with several processes; returns this rank's device.

    ``settings`` is the config's ``distributed`` section. CUDA ranks take GPU ``LOCAL_RANK``.
    """
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = settings.backend if settings.backend != "auto" else (
            "nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError("distributed.backend 'nccl' needs CUDA devices; use gloo on CPUs")
        dist.init_process_group(backend, timeout=timedelta(seconds=settings.timeout_s))
        atexit.register(_leave)
    return device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """End a job that succeeded: every rank waits for the others, then all leave the group.

    Without the barrier a rank with less to do (not rank 0, which evaluates and writes) left
    first, and gloo's threads could abort that process at exit (SIGABRT, "terminate called
    without an active exception"), failing a job whose work was done. The wait is bounded by
    ``distributed.timeout_s``; a failed job skips it (its error ends the ranks instead).
    """
    if dist.is_initialized():
        dist.barrier()
        _leave()


def _comm_device() -> torch.device:
    """Where tensors must be for a collective: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable, small) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def broadcast_tensor(tensor: torch.Tensor | None) -> torch.Tensor:
    """Rank 0's CPU tensor on every rank, sent in bounded chunks (a pool may be gigabytes)."""
    shape, dtype = broadcast_object(None if tensor is None else (tuple(tensor.shape), tensor.dtype))
    out = tensor.contiguous() if is_main() else torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    device = _comm_device()
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK]
        buf = part.to(device) if device.type != "cpu" else part
        dist.broadcast(buf, src=0)
        if buf is not part:
            part.copy_(buf.cpu())
    return out


def on_rank0(fn: Callable[[], Any], what: str, describe: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Run ``fn()`` on rank 0 alone; (its result on rank 0 / None elsewhere, ``describe(result)``
    on every rank). A failure on rank 0 is raised there and stops the others with a message."""
    result, failure = None, None
    if is_main():
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - raised below, after the others hear of it
            failure = exc
    status = broadcast_object(None if not is_main() else
                              ("error", f"{type(failure).__name__}: {failure}") if failure is not None
                              else ("ok", describe(result)))
    if failure is not None:
        raise failure
    if status[0] == "error":
        raise PeerFailed(f"rank 0 failed while {what}: {status[1]}")
    return result, status[1]


def from_rank0(fn: Callable[[], tuple[torch.Tensor, ...]], what: str = "paying for the pool"):
    """``fn()`` run on rank 0 alone (it queries the teacher), its tensors given to every rank."""
    if world_size() == 1:
        return fn()
    result, count = on_rank0(fn, what, len)
    return tuple(broadcast_tensor(result[i] if is_main() else None) for i in range(count))


def checkpoint_from_rank0(path) -> dict | None:
    """For ``Engine.resume``: None in a single process (it reads ``path`` itself); under
    torchrun the checkpoint as rank 0 reads it, or ``{}`` when it has none, on every rank."""
    if world_size() == 1:
        return None
    from pathlib import Path

    from b2kd.core.checkpoint import read

    return broadcast_object((read(path) if Path(path).is_file() else {}) if is_main() else None)


def wrap(model: torch.nn.Module, device: torch.device, sync_batchnorm: bool = False) -> torch.nn.Module:
    """The module to train: ``model`` itself in one process, a DDP copy sharing its
    parameters under torchrun (BatchNorm synchronised across ranks if asked)."""
    if world_size() == 1:
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError("distributed.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm);"
                              " on CPUs each rank normalises over its own part of the batch")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def my_indices(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's share of a global batch of indices and the weight of its mean loss (see
    :func:`my_part`); ``idx`` itself and 1.0 in a single process."""
    if world_size() == 1:
        return idx, 1.0
    if rank() >= len(idx):  # a last batch smaller than the world: nothing left for this rank
        return idx[:1], 0.0
    mine = torch.arange(rank(), len(idx), world_size())
    return idx[mine.to(idx.device)], len(mine) * world_size() / len(idx)


def my_part(idx: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """This rank's share of a global batch (pool indices and their images, positions
    ``rank, rank + W, ...``) and the weight of its mean loss, ``W x share / batch``, so that
    DDP's average of the ranks' gradients is the gradient of the whole batch's mean loss.

    A rank left with nothing (a last batch smaller than W) trains on one image at weight 0.
    """
    if world_size() == 1:
        return idx, images, 1.0
    mine, weight = my_indices(torch.arange(len(idx)))
    return idx[mine.to(idx.device)], images[mine.to(images.device)], weight


def mean_over_ranks(record: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks (the same dict in a single process)."""
    if world_size() == 1:
        return record
    keys = sorted(record)
    values = torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(values)
    return {k: v / world_size() for k, v in zip(keys, values.tolist(), strict=True)}


def scaled_lr(lr: float, rule: str) -> float:
    """The learning rate for an effective batch of ``world size x batch_size``: "none" keeps
    ``lr``; "linear" multiplies it by the world size (Goyal et al., 2017), "sqrt" by its root."""
    w = world_size()
    if w == 1 or rule == "none":
        return lr
    return lr * (w if rule == "linear" else math.sqrt(w))


def rank_generator(shared: torch.Generator, seed: int, epoch: int) -> torch.Generator:
    """The RNG of this rank's own draws (noise, augmentations) after the shared permutation:
    ``shared`` itself in one process, a distinct seeded stream on each rank otherwise."""
    if world_size() == 1:
        return shared
    return torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_009 + rank() + 1)


def check_supported(cfg, method_cls) -> None:
    """Refuse, before anything is paid, what data-parallel distillation cannot do correctly yet."""
    if world_size() == 1:
        return
    if cfg.distill.local_unlabelled:
        raise ConfigError("distill.local_unlabelled is not supported under torchrun with more than"
                          " one process yet: run the semi-supervised term in a single process")
    if cfg.distill.feature_weight > 0 and "embedding" in str(cfg.distill.response):
        raise ConfigError("gray-box feature matching (a +embedding response) is not supported under"
                          " torchrun with more than one process yet: its projection is not synchronised;"
                          " run it in a single process or set distill.feature_weight=0")
    if not getattr(method_cls, "data_parallel", True):
        raise ConfigError(f"method '{method_cls.name}' trains a model of its own beside the student"
                          " that DistributedDataParallel does not synchronise: run it in a single process")


#: What gloo and NCCL say (as plain RuntimeErrors) when a peer died or a collective timed out.
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "third_party/gloo", "NCCL",
              "timed out", "Timed out", "Timeout")


def peer_failure(exc: BaseException) -> str | None:
    """A clear line for an error raised because another rank failed or stopped answering
    (a collective that timed out or lost its peer); None for any other error."""
    if isinstance(exc, PeerFailed):
        return str(exc)
    lost = isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in _PEER_LOST))
    if world_size() > 1 and lost:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"rank {rank()} stopped: another process of this torchrun job failed or stopped"
                f" answering ({text[:200]}); its own message says why. Re-run the same command to"
                " resume from the last checkpoint (paid queries are kept)")
    return None
