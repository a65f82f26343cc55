"""Train the cloud's teacher (the only stage that sees labels) and save it with its metadata."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from b2kd.core import distributed
from b2kd.core.checkpoint import save_classifier
from b2kd.core.config import Config
from b2kd.core.engine import Engine, make_optimizer, make_scheduler
from b2kd.core.metrics import evaluate
from b2kd.core.runtime import fast_layout
from b2kd.data import Augment, load_dataset
from b2kd.models import build_model


def trained_with(cfg: Config) -> dict:
    """Everything that decides the teacher's weights: a cached teacher is reused only if it matches."""
    return {
        "seed": cfg.seed,
        "data": cfg.data.model_dump(mode="json", exclude={"dev_size"}),  # dev images: never trained on
        # where the teacher is found (file, URL, key, wire format) does not decide its weights
        "teacher": cfg.teacher.model_dump(mode="json", exclude={"checkpoint", "url", "api_key", "binary"}),
    }


def train_teacher(cfg: Config, out: str | Path, device: torch.device, log=print) -> dict:
    """Train ``cfg.teacher.arch`` on the full training split; returns the checkpoint metadata."""
    out = Path(out)
    d, t = cfg.data, cfg.teacher
    train = load_dataset(d.dataset, "train", d.root, d.image_size, d.channels)
    test = load_dataset(d.dataset, "test", d.root, d.image_size, d.channels)
    torch.manual_seed(cfg.seed)
    model = fast_layout(build_model(t.arch, train.num_classes, d.channels, d.image_size).to(device))
    trainee = distributed.wrap(model, device, cfg.distributed.sync_batchnorm)  # DDP under torchrun
    batch = t.batch_size * distributed.world_size()  # the effective batch: per rank x world size
    optimizer = make_optimizer(model, distributed.scaled_lr(t.lr, cfg.distributed.scale_lr), t.momentum,
                               t.weight_decay)
    scheduler = make_scheduler(optimizer, "cosine", t.epochs, [])
    meta = {
        "role": "teacher",
        "dataset": d.dataset,
        "image_size": d.image_size,
        "channels": d.channels,
        "num_classes": train.num_classes,
        "trained_with": trained_with(cfg),
        "normalisation": {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()},
    }
    engine = Engine(out, model, optimizer, scheduler, t.epochs, cfg.seed, select="last", meta=meta,
                    writes=distributed.is_main())
    engine.resume(distributed.checkpoint_from_rank0(engine.latest_path))
    augment = Augment(crop_padding=t.crop_padding)
    images, labels = train.images, train.labels

    def train_epoch(epoch: int, gen: torch.Generator) -> dict:
        perm = torch.randperm(len(images), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            # under torchrun each rank trains on its part of the batch (b2kd.core.distributed)
            idx, x, weight = distributed.my_part(idx, augment(images[idx], generator=gen))
            loss = F.cross_entropy(trainee(x.to(device)), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            (loss if weight == 1.0 else loss * weight).backward()
            optimizer.step()
            total, n = total + loss.item() * len(idx), n + len(idx)
        return distributed.mean_over_ranks({"loss": total / n})

    engine.run(train_epoch, on_epoch=lambda r: log(f"teacher epoch {r['epoch'] + 1}/{t.epochs}"
                                                   f" loss {r['loss']:.4f} ({r['seconds']:.0f}s)"))
    if not distributed.is_main():  # rank 0 evaluates and writes the teacher
        return meta
    result = evaluate(model, test.images, test.labels, test.num_classes)
    meta.update(test_acc=result["acc"], per_class_acc=result["per_class_acc"], epochs=t.epochs,
                arch=t.arch)
    save_classifier(model.cpu(), out / "teacher.pt", **meta)
    return meta
