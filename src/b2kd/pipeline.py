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

from b2kd import __version__
from b2kd.core import distributed
from b2kd.blackbox import LocalBackend, ResponseKind
from b2kd.edge import BlackBoxTeacher, Ledger
from b2kd.edge.cache import SharedCache
from b2kd.core.engine import short_run_warning
from b2kd.core.checkpoint import CheckpointError, load_classifier, load_generator
from b2kd.core.config import Config, ConfigError, save_config
from b2kd.data import dev_split, edge_split, load_dataset, private_images
from b2kd.core.metrics import evaluate, predict
from b2kd.distill.methods import get_method
from b2kd.models.fold import fold_frozen
from b2kd.core.progress import QueryProgress
from b2kd.core.run_dir import (check_ledger, check_same_run, check_writable, check_yaml, fingerprints,
                          nothing_left_if_refused, record_run)
from b2kd.core.runtime import fast_layout, hardware, setup


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


def teacher_checkpoint(cfg: Config) -> Path:
    if not cfg.teacher.checkpoint:
        raise ConfigError("no teacher given: pass --teacher PATH (or set teacher.checkpoint)")
    return Path(cfg.teacher.checkpoint)


def open_teacher(cfg: Config, run_dir: Path, response: str, budget: int | None, stage: str) -> BlackBoxTeacher:
    """The black-box teacher of one run: backend + this run's ledger + budget.

    The backend is the served teacher at ``teacher.url`` when there is one (its
    response kind is the server's, so it must be the one this stage asks for),
    else the checkpoint run in-process.
    """
    kind = ResponseKind.parse(response)
    if cfg.teacher.url:
        from b2kd.edge.client import HTTPTeacher

        backend = HTTPTeacher.from_config(cfg.teacher)
        if backend.kind.embedding and backend.kind.base == kind:
            backend.without_embedding()  # a gray-box server also answers plain probabilities
        if backend.kind != kind:
            backend.close()
            raise ConfigError(f"the teacher at {backend.url} answers '{backend.kind}' responses but"
                              f" {stage}.response is '{kind}'; ask for '{backend.kind}'")
    else:
        backend = LocalBackend.from_checkpoint(teacher_checkpoint(cfg), kind)
    if cfg.teacher.shared_cache:
        backend = SharedCache(backend, Ledger(cfg.teacher.shared_cache), stage)
    return BlackBoxTeacher(backend, Ledger(run_dir / "ledger.sqlite"), budget=budget, stage=stage,
                           allow_mixed_providers=cfg.teacher.allow_mixed_providers)


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run directory was made with (a clear error when there is none)."""
    from b2kd.core.config import load_config

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a b2kd run directory (no config.yaml)")
    check_yaml(run_dir / "config.yaml")
    return load_config(run_dir / "config.yaml")


def edge_private_images(cfg: Config) -> torch.Tensor:
    """The edge's private local set (uint8, no labels), seeded by ``data.split_seed``.

    With ``data.private_dataset`` it is that dataset's whole train split instead;
    ``data.private_shift`` then draws it with a gap from the teacher's data.
    """
    from b2kd.data.shift import corrupt, imbalance

    d = cfg.data
    if d.private_dataset:
        private = load_dataset(d.private_dataset, "train", d.private_root, d.image_size, d.channels)
        images, labels = private.images, private.labels
    else:
        train = load_dataset(d.dataset, "train", d.root, d.image_size, d.channels)
        split = edge_split(len(train), d.local_fraction, d.split_seed)
        images, labels = private_images(train, split), train.labels[split.local_idx]
    if d.private_shift == "imbalance":
        images = images[imbalance(labels, d.shift_classes, d.shift_factor, d.split_seed)]
    elif d.private_shift == "corrupt":
        try:
            images = corrupt(images, d.split_seed, tuple(d.corruptions))
        except ValueError as error:
            raise ConfigError(f"data.corruptions: {error}") from None
    return images


def edge_dev_set(cfg: Config):
    """The labelled dev split (images, labels): training images outside the private set."""
    d = cfg.data
    train = load_dataset(d.dataset, "train", d.root, d.image_size, d.channels)
    split = edge_split(len(train), d.local_fraction, d.split_seed)
    idx = dev_split(len(train), split.local_idx, d.dev_size, d.split_seed)
    return train.images[idx], train.labels[idx]


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
        check_teacher_inputs(cfg, out)
        private = edge_private_images(cfg)
        start_run(cfg, out, "deprivatize", {"teacher.checkpoint": cfg.teacher.checkpoint})
        teacher = distributed.teacher_on_rank0(
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
    """Pay for the pool and train the student; a run refused before its first query leaves nothing."""
    out, device = prepare_run(cfg, out, "distill")
    with nothing_left_if_refused(out, distributed.is_main()):
        return _distill_run(cfg, out, device, log)


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
    on_device = d.local_unlabelled or (method.source == "generator" and d.anchor_share > 0) or d.coral_weight > 0
    private = edge_private_images(cfg) if method.source == "local" or on_device else None
    generator, discriminator = _gan_inputs(cfg, method, device)
    check_teacher_inputs(cfg, out)
    if warning := short_distillation(cfg):
        log(f"warning: {warning}")
    start_run(cfg, out, "distill", {"teacher.checkpoint": cfg.teacher.checkpoint,
                                    "deprivatize.generator": None if generator is None else cfg.deprivatize.generator})
    teacher = distributed.teacher_on_rank0(lambda: open_teacher(cfg, out, d.response, d.budget, "distill"),
                                           d.budget)
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


def run_evaluate(run_dir: str | Path, cfg: Config | None = None) -> dict:
    """Test-set report of a distillation run: last and best-on-validation students."""
    from b2kd.pool import labels as pool_labels
    from b2kd.evaluate.report import write_report
    from b2kd.evaluate.synthetic_gap import synthetic_vs_real

    run_dir = Path(run_dir)
    if cfg is None:
        cfg = load_run_config(run_dir)
    d = cfg.data
    test = load_dataset(d.dataset, "test", d.root, d.image_size, d.channels)
    teacher_pred = None  # fidelity needs a local copy of the teacher; a served teacher alone has none
    if cfg.teacher.checkpoint or not cfg.teacher.url:
        teacher, _ = load_classifier(teacher_checkpoint(cfg))
        teacher_pred = predict(teacher, test.images)
    result: dict = {
        "run": str(run_dir),
        "b2kd_version": __version__,
        "hardware": hardware(),
        "method": cfg.distill.method,
        "response": cfg.distill.response,
        "budget": cfg.distill.budget,
        "teacher_acc": None if teacher_pred is None else float((teacher_pred == test.labels).float().mean()),
    }
    for name in ("latest", "best"):
        path = run_dir / "checkpoints" / f"{name}.pt"
        student, meta = load_classifier(path)
        result[name] = {**evaluate(student, test.images, test.labels, test.num_classes, teacher_pred),
                        "epoch": meta.get("epoch")}
    if d.dev_size:
        dev_images, dev_labels = edge_dev_set(cfg)
        for name in ("latest", "best"):
            student, _ = load_classifier(run_dir / "checkpoints" / f"{name}.pt")
            result[name]["dev_acc"] = float((predict(student, dev_images) == dev_labels).float().mean())
        result["dev_acc"] = result["best"]["dev_acc"]
        best, _ = load_classifier(run_dir / "checkpoints" / "best.pt")
        result["synthetic_vs_real"] = synthetic_vs_real(best, run_dir, dev_images, dev_labels, test.num_classes)
    result["student_acc"] = result["best"]["acc"]
    result["fidelity"] = result["best"].get("fidelity")
    ledger_path = run_dir / "ledger.sqlite"
    if ledger_path.is_file():
        with Ledger(ledger_path) as ledger:
            result.update(ledger.totals())
            result["private_images_sent"] = ledger.private_images_sent(edge_private_images(cfg))
    summary_path = run_dir / "distill.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        result["train_img_per_s"] = summary.get("train_img_per_s")
        result["best_epoch"] = summary.get("best_epoch")
    result["pool_labels"] = pool_labels.run_summary(run_dir, cfg.distill.response,
                                                    cfg.distill.thin_class_factor)
    write_report(run_dir, result)
    return result
