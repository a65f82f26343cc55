"""The stages as functions of a resolved config: what the CLI and the demo call.

Each stage writes into its own run directory: the resolved ``config.yaml``,
its ``ledger.sqlite`` when it queries the teacher, checkpoints and reports.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Self

import torch

from b2kd.core import distributed
from b2kd.core.checkpoint import CheckpointError
from b2kd.core.config import Config, ConfigError
from b2kd.core.engine import short_run_warning
from b2kd.core.progress import QueryProgress
from b2kd.core.run_dir import (
    check_ledger,
    inherit_provider,
    load_run_config,
    nothing_left_if_refused,
)
from b2kd.core.runtime import fast_layout, prepare_run, start_run
from b2kd.data.edge_sets import edge_dev_set, edge_private_images
from b2kd.distill.methods import get_method
from b2kd.edge.connect import open_teacher, teacher_checkpoint, teacher_on_rank0
from b2kd.evaluate.run import run_evaluate
from b2kd.models import load_classifier, load_generator
from b2kd.models.fold import fold_frozen

#: What the CLI, the demo and the benches call; the helpers among them are defined in their stages
#: (core.runtime, core.run_dir, data.edge_sets, evaluate.run) and importable from here too.
__all__ = ["edge_dev_set", "edge_private_images", "load_run_config", "prepare_run", "run_deprivatize",
           "run_distill", "run_evaluate", "run_teacher", "short_distillation", "start_run"]


def _loads(load, path: str | Path):
    """``load(path)``, with a checkpoint that torch reads but cannot rebuild as one line too."""
    try:
        return load(path)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot load {path}: {str(exc).splitlines()[0][:200]}") from None


def check_teacher_inputs(cfg: Config, out: Path) -> None:
    """Before the first query: the teacher checkpoint (queried, or kept to evaluate the student
    against) loads, and the ledgers this run writes pass SQLite's quick_check."""
    if cfg.teacher.checkpoint or not cfg.teacher.url:
        _loads(load_classifier, teacher_checkpoint(cfg))
    check_ledger(out / "ledger.sqlite")
    if cfg.teacher.shared_cache:
        check_ledger(Path(cfg.teacher.shared_cache))


def _quiet(*args, **kwargs) -> None:
    pass


def short_distillation(cfg: Config) -> str | None:
    """Before paying: a warning when the student would train too few steps to learn (b2kd.core.engine);
    None for a long enough run, or one stopped early on purpose (distill.max_steps)."""
    d = cfg.distill
    if d.max_steps is not None:
        return None
    train = d.budget - round(d.budget * d.val_fraction)
    steps = d.steps or d.epochs * math.ceil(train / (d.batch_size * distributed.world_size()))
    return short_run_warning(steps, d.warmup_steps)


def _progress(label: str, budget: int | None, spent: int):
    """The query bar on rank 0 (the one that pays); none on the other ranks."""
    return QueryProgress(label, budget, spent) if distributed.is_main() else _NoBar()


class _NoBar:
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, spent: int) -> None:
        pass


def run_teacher(cfg: Config, out: str | Path, log=print) -> dict:
    from b2kd.teacher.train import train_teacher

    out, device = prepare_run(cfg, out, "teacher")
    with nothing_left_if_refused(out, distributed.is_main()):
        start_run(cfg, out, "teacher", {})
        meta = train_teacher(cfg, out, device, log if distributed.is_main() else _quiet)
    if distributed.is_main():
        (out / "report.json").write_text(json.dumps(meta, indent=2))
    return meta


def run_deprivatize(cfg: Config, out: str | Path, log=print) -> dict:
    from b2kd.deprivatize.run import deprivatize

    out, device = prepare_run(cfg, out, "deprivatize")
    with nothing_left_if_refused(out, distributed.is_main()):
        inherit_provider(cfg, [out], log if distributed.is_main() else _quiet)  # a resumed run's
        check_teacher_inputs(cfg, out)
        private = edge_private_images(cfg)
        start_run(cfg, out, "deprivatize", {"teacher.checkpoint": cfg.teacher.checkpoint})
        teacher = teacher_on_rank0(
            lambda: open_teacher(cfg, out, cfg.deprivatize.response, cfg.deprivatize.max_queries, "deprivatize"),
            cfg.deprivatize.max_queries)
        start = time.perf_counter()
        with _progress("deprivatize queries", cfg.deprivatize.max_queries, teacher.spent) as bar:
            result = deprivatize(cfg.deprivatize, private, teacher, out, cfg.seed, device, bar.update,
                                 log if distributed.is_main() else _quiet, parallel=cfg.distributed)
    if not distributed.is_main():  # rank 0 reports for the whole job
        return result
    result.update(teacher.ledger.totals())
    result["private_images_sent"] = teacher.ledger.private_images_sent(private)
    result["seconds"] = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(result, indent=2))
    teacher.ledger.close()
    return result


def run_distill(cfg: Config, out: str | Path, log=print) -> dict:
    """Pay for the pool and train the student; a run refused before its first query leaves nothing.

    The served teacher's settings not given are inherited (``cfg.teacher`` is updated): from a
    resumed run's own config.yaml, else from the generator's run directory."""
    out, device = prepare_run(cfg, out, "distill")
    with nothing_left_if_refused(out, distributed.is_main()):
        inherit_provider(cfg, _provider_sources(cfg, out), log if distributed.is_main() else _quiet)
        return _distill_run(cfg, out, device, log)


def _provider_sources(cfg: Config, out: Path) -> list[Path]:
    """Where a distillation's provider settings were stored: its own run, then its generator's."""
    sources = [out]
    if cfg.deprivatize.generator and get_method(cfg.distill.method).source == "generator":
        sources.append(Path(cfg.deprivatize.generator).parent)
    return sources


def _gan_inputs(cfg: Config, method, device: torch.device):
    """(generator, discriminator) a distillation reads, each None when it reads none; loaded
    before the first query, so a missing or truncated file is one line and nothing is paid."""
    generator = discriminator = None
    if method.source == "generator":
        if not cfg.deprivatize.generator:
            raise ConfigError("no generator given: pass --generator PATH (or set deprivatize.generator)")
        generator, _ = _loads(load_generator, cfg.deprivatize.generator)
        # frozen from here on: folded into fewer, equivalent layers (b2kd.models.fold; 2.3-2.6x faster)
        generator = fast_layout(fold_frozen(generator).to(device))
    if cfg.distill.balance_realism > 0:  # a generator method's balanced pool (checked before)
        from b2kd.pool.realism import load_discriminator

        discriminator = _loads(load_discriminator, cfg.deprivatize.generator).to(device)
    return generator, discriminator


def _distill_run(cfg: Config, out: Path, device: torch.device, log) -> dict:
    from b2kd.distill.run import distill

    d = cfg.distill
    method = get_method(d.method)
    distributed.check_supported(cfg, method)
    if d.balance_realism > 0 and (method.source != "generator" or d.pool != "balanced"):
        raise ConfigError("distill.balance_realism chooses the candidates of a generator method's balanced"
                          f" pool; method '{d.method}' with distill.pool={d.pool} has none (set"
                          " distill.pool=balanced, or leave distill.balance_realism at 0)")
    if not distributed.is_main():
        log = _quiet
    if method.white_box and cfg.teacher.url:
        raise ConfigError(f"method '{d.method}' is white-box (it reads the teacher's weights and"
                          " gradients) and cannot run against a remote teacher; drop teacher.url")
    # a local-data method (KN, KD, ...) queries private images as they are and needs no generator
    on_device = d.local_unlabelled
    private = edge_private_images(cfg) if method.source == "local" or on_device else None
    generator, discriminator = _gan_inputs(cfg, method, device)
    check_teacher_inputs(cfg, out)
    if warning := short_distillation(cfg):
        log(f"warning: {warning}")
    start_run(cfg, out, "distill", {"teacher.checkpoint": cfg.teacher.checkpoint,
                                    "deprivatize.generator": None if generator is None else cfg.deprivatize.generator})
    teacher = teacher_on_rank0(lambda: open_teacher(cfg, out, d.response, d.budget, "distill"), d.budget)
    setup = None
    if generator is not None and d.reuse_setup and distributed.is_main():  # rank 0 makes the pool
        from b2kd.pool.paid import setup_answers

        gan_dir = Path(cfg.deprivatize.generator).parent
        gan_cfg = load_run_config(gan_dir) if (gan_dir / "config.yaml").is_file() else cfg
        setup = setup_answers(gan_dir / "ledger.sqlite", gan_cfg.deprivatize.response, d.response)
        if setup is None:
            log(f"distill.reuse_setup: no usable setup answers in {gan_dir}; the pool is the budget's only")
    made = None
    if private is not None:
        made, what = tuple(private.shape[1:3]), "private images are"
    elif generator is not None:
        made, what = (generator.config["channels"], generator.config["image_size"]), "generator makes"
    if made is not None and made != teacher.image_shape[:2]:
        raise CheckpointError(
            f"the {what} {made[0]}x{made[1]} images"
            f" but the teacher takes {teacher.image_shape}"
        )
    local_model = None
    if method.white_box and distributed.is_main():
        local_model = teacher.backend.model.to(device)
    start = time.perf_counter()
    with _progress(f"{d.method}/{d.response} queries", d.budget, teacher.spent) as bar:
        summary = distill(cfg, teacher, generator, out, device, bar.update, log,
                          private=private if method.source == "local" else None,
                          local_model=local_model, unlabelled=private if on_device else None,
                          setup=setup, discriminator=discriminator)
    summary["seconds"] = time.perf_counter() - start
    teacher.ledger.close()
    if distributed.is_main():
        (out / "distill.json").write_text(json.dumps(summary, indent=2))
    return summary
