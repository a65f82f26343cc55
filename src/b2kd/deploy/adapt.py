"""``b2kd adapt``: a task the teacher does not cover, learnt on the device from a distilled student.

The device owner labels a few images of new classes (or a new label set over the same
images); :func:`adapt_run` takes K of each class (a seeded choice), fits a new linear head
on the distilled student's penultimate features, then fine-tunes the whole student while
its old head is held to the distilled student's answers on the run's private images
(b2kd.deploy.adapt_train). No image leaves the device: no teacher is opened and nothing is sent,
so the run's ledger is never touched and the report says ``queries: 0``.

OUT holds ``checkpoints/best.pt`` (the student's body with the new head: new-task logits),
``checkpoints/old.pt`` (the same body with the old head), ``report.json``/``report.md`` and
what ``b2kd export OUT`` reads as for any run: a ``config.yaml`` whose dataset is
``task.npz`` (the shots as its train split, the new task's test set as its test split, or
the shots again when no test set is given) and whose teacher is none (it knows no new
class), and ``pool.pt``, generator images of the run's paid pool to calibrate INT8 on.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from b2kd import __version__
from b2kd.core.checkpoint import CheckpointError, atomic_save, read, save_classifier
from b2kd.core.config import Config, ConfigError, load_config, save_config
from b2kd.core.metrics import accuracy, per_class_accuracy, predict
from b2kd.core.run_dir import check_yaml, load_run_config
from b2kd.core.runtime import hardware, setup
from b2kd.data import load_dataset
from b2kd.data.edge_sets import edge_private_images
from b2kd.data.labelled import LabelledSet, check_shape, choose_shots, read_labelled
from b2kd.deploy.adapt_train import finetune, train_head
from b2kd.models import load_classifier
from b2kd.models.heads import TwoHeads

CALIBRATION_POOL = 2048  # generator images of the run's pool copied to OUT/pool.pt for INT8


def student_checkpoint(run_dir: str | Path) -> Path:
    """``RUN/checkpoints/best.pt`` of a `b2kd distill` run; a clear error for anything else."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoints" / "best.pt"
    if not (run_dir / "config.yaml").is_file() or not path.is_file():
        raise CheckpointError(f"{run_dir} is not a `b2kd distill` run directory (it needs config.yaml"
                              " and checkpoints/best.pt)")
    role = read(path, "classifier")["meta"].get("role")
    if role != "student":
        raise CheckpointError(f"{run_dir} is not a `b2kd distill` run: checkpoints/best.pt is not a"
                              f" distilled student (role: {role or 'none'})")
    return path


def load_adapt_config(run_dir: str | Path, options: dict | None = None,
                      overrides: list[str] | None = None) -> Config:
    """The run's own config.yaml, then the adapt options and overrides on top."""
    student_checkpoint(run_dir)
    check_yaml(Path(run_dir) / "config.yaml")  # malformed: one line (file:line:column), no traceback
    return load_config(Path(run_dir) / "config.yaml", options, overrides)


def _check_out(run_dir: Path, out: Path) -> None:
    if out.resolve() == run_dir.resolve():
        raise ConfigError(f"--out {out} is the run directory itself; adapt writes a directory of its own")
    if (out / "ledger.sqlite").exists():
        raise ConfigError(f"--out {out} holds a query ledger (another run); choose another directory")


def _scores(model: torch.nn.Module, data: LabelledSet | None) -> dict | None:
    if data is None:
        return None
    pred = predict(model, data.images)
    return {"acc": accuracy(pred, data.labels),
            "per_class_acc": per_class_accuracy(pred, data.labels, len(data.classes))}


def _write_task(out: Path, shots: LabelledSet, test: LabelledSet | None) -> Path:
    """task.npz: what `b2kd export OUT` evaluates on (the npz reader's x/y train and test)."""
    evaluated = test if test is not None else shots
    path = out / "task.npz"
    np.savez(path, x_train=shots.images.numpy(), y_train=shots.labels.numpy(),
             x_test=evaluated.images.numpy(), y_test=evaluated.labels.numpy(),
             classes=np.array(shots.classes))
    return path


def _write_calibration_pool(run_dir: Path, out: Path, seed: int) -> str | None:
    """Generator images of the run's paid pool for INT8 calibration (never private images)."""
    path = run_dir / "pool.pt"
    if not path.is_file():
        return None
    pool = read(path, "pool")
    if pool.get("source", "generator") != "generator":
        return None
    idx = torch.randperm(len(pool["images"]), generator=torch.Generator().manual_seed(seed))
    images = pool["images"][idx[:CALIBRATION_POOL]].clone()
    atomic_save({"kind": "pool", "source": "generator", "seed": seed, "images": images,
                 "note": f"calibration images taken from {path}"}, out / "pool.pt")
    return f"{len(images)} generator images of {path}"


def _out_config(cfg: Config, out: Path, task: Path) -> Config:
    """OUT's config.yaml: the run's, with the new task as its dataset and no teacher."""
    tree = cfg.model_dump(mode="json")
    tree["out"] = str(out)
    tree["data"] = {"dataset": "npz", "root": str(task.resolve()), "image_size": cfg.data.image_size,
                    "channels": cfg.data.channels, "dev_size": 0}
    tree["teacher"] = {**tree["teacher"], "checkpoint": None, "url": None, "shared_cache": None}
    return Config.model_validate(tree)


@dataclass
class NewTask:
    """The new task's labelled images: all of them, the shots trained on, and the test set if any."""

    labelled: str | Path
    data: LabelledSet
    train: LabelledSet
    test: LabelledSet | None


def _read_task(labelled: str | Path, shots: int, a, student: torch.nn.Module) -> NewTask:
    """The labelled images and the seeded shots per class, checked against the student's input."""
    c = student.config
    data = read_labelled(labelled, a.classes)
    check_shape(data, c["in_channels"], c["image_size"], f"the {student.arch} student")
    train = choose_shots(data, shots, a.seed)
    test = None
    if a.test:
        test = read_labelled(a.test, data.classes)
        check_shape(test, c["in_channels"], c["image_size"], f"the {student.arch} student")
    return NewTask(labelled, data, train, test)


def _learn(student: torch.nn.Module, task: NewTask, private: torch.Tensor | None, cfg: Config,
           device: torch.device, log) -> tuple[TwoHeads, dict, dict | None, dict | None]:
    """The new head on the frozen body, then (with ``adapt.finetune_epochs``) the body fine-tuned
    with the old head kept close to the student on the private images: (model, head, its test
    scores, fine-tuning)."""
    a = cfg.adapt
    model = TwoHeads(student, len(task.data.classes), a.seed).to(device)
    head = train_head(model, task.train.images, task.train.labels, a, device)
    head_test = _scores(model.classifier("new"), task.test)
    log(f"head ({a.head_epochs} epochs): train accuracy {100 * head['train_acc']:.1f}%"
        + ("" if head_test is None else f", test {100 * head_test['acc']:.2f}%"))
    tuned = None
    if a.finetune_epochs:
        tuned = finetune(model, student, task.train.images, task.train.labels, private, a,
                         cfg.distill.crop_padding, device)
        log(f"fine-tuning ({tuned['steps']} steps, keep weight {a.keep_weight}): mean new-task CE"
            f" {tuned['mean_ce']:.4f}, mean keep KL {tuned['mean_keep_kl']:.4f}")
    return model, head, head_test, tuned


def _write_outputs(run_dir: Path, out: Path, cfg: Config, task: NewTask, new_model: torch.nn.Module,
                   old_model: torch.nn.Module, arch: str, shots: int) -> str | None:
    """OUT's checkpoints (new and old head), task.npz, calibration pool and config.yaml; returns
    what the calibration pool holds (None without one)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"role": "adapted", "source_run": str(run_dir), "arch": arch, "shots": shots,
            "classes": task.data.classes, "seed": cfg.adapt.seed}
    save_classifier(new_model, out / "checkpoints" / "best.pt", **meta, task="new")
    save_classifier(old_model, out / "checkpoints" / "old.pt", **meta, task="old")
    path = _write_task(out, task.train, task.test)
    calibration = _write_calibration_pool(run_dir, out, cfg.seed)
    save_config(_out_config(cfg, out, path), out / "config.yaml")
    return calibration


def adapt_run(run_dir: str | Path, labelled: str | Path, shots: int, out: str | Path | None = None,
              cfg: Config | None = None, log=print) -> dict:
    """Learn the new task in ``labelled`` from ``shots`` images per class; writes OUT (default RUN/adapt).

    ``cfg`` is the run's config with any ``adapt.*`` settings (default: RUN/config.yaml).
    """
    run_dir = Path(run_dir)
    checkpoint = student_checkpoint(run_dir)
    cfg = (cfg or load_run_config(run_dir)).model_copy(deep=True)
    if labelled is None:
        raise ConfigError("adapt needs --labelled PATH: a folder of class folders, or an .npz")
    if shots is None or shots < 1:
        raise ConfigError("adapt needs --shots K, the labelled images taken per class (K >= 1)")
    a = cfg.adapt = cfg.adapt.model_copy(update={"run": str(run_dir), "labelled": str(labelled),
                                                 "shots": shots})
    out = Path(out) if out is not None else run_dir / "adapt"
    _check_out(run_dir, out)
    device = setup(a.seed, cfg.threads, cfg.device)

    # every input is read and checked before anything trains
    student, _ = load_classifier(checkpoint)
    task = _read_task(labelled, shots, a, student)
    d = cfg.data
    old_test = load_dataset(d.dataset, "test", d.root, d.image_size, d.channels)
    private = edge_private_images(cfg) if a.finetune_epochs else None
    log(f"new task: {len(task.data.classes)} classes ({', '.join(task.data.classes)}), {shots} shot(s) each"
        f" of {len(task.data)} labelled images;"
        f" {'no test set' if task.test is None else f'{len(task.test)} test images'}")

    start = time.perf_counter()
    student = student.to(device).eval()
    before = predict(student, old_test.images)
    model, head, head_test, tuned = _learn(student, task, private, cfg, device, log)
    new_model, old_model = model.classifier("new"), model.classifier("old")
    seconds = time.perf_counter() - start

    final = _scores(new_model, task.test)
    after = predict(old_model, old_test.images)
    calibration = _write_outputs(run_dir, out, cfg, task, new_model, old_model, student.arch, shots)
    result = {
        "run": str(run_dir), "out": str(out), "b2kd_version": __version__, "hardware": hardware(),
        "student": student.arch, "features": model.new_head.in_features,
        **_task_report(task, shots, a, head, head_test, tuned, final),
        "old_task": _old_task_report(d.dataset, old_test, before, after),
        "checkpoints": {"new": "checkpoints/best.pt", "old": "checkpoints/old.pt"},
        "export": "`b2kd export OUT` exports checkpoints/best.pt: the body with the new head"
                  " (new-task logits); its accuracy is on task.npz's test split"
                  + (" (the shots themselves: no test set was given)" if task.test is None else ""),
        "calibration": calibration,
        "seconds": seconds,
    }
    (out / "report.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(markdown(result))
    return result


def _task_report(task: NewTask, shots: int, a, head: dict, head_test: dict | None, tuned: dict | None,
                 final: dict | None) -> dict:
    """The report's part on the new task: what was learnt from, and how well."""
    test = task.test
    return {
        "labelled": str(task.labelled), "classes": task.data.classes, "shots": shots, "seed": a.seed,
        "labelled_images": len(task.data), "train_images": len(task.train),
        # nothing is sent: no teacher is opened, the run's ledger is not opened either
        "queries": 0, "bytes_sent": 0, "bytes_received": 0, "private_images_sent": 0,
        "head": {"epochs": a.head_epochs, "lr": a.lr, **head},
        "finetune": tuned,
        "new_task": {
            "test": a.test, "test_images": None if test is None else len(test),
            "chance": 1 / len(task.data.classes),
            "head_acc": None if head_test is None else head_test["acc"],
            "finetuned_acc": None if tuned is None or final is None else final["acc"],
            "acc": None if final is None else final["acc"],
            "per_class_acc": None if final is None else final["per_class_acc"],
        },
    }


def _old_task_report(dataset: str, old_test, before: torch.Tensor, after: torch.Tensor) -> dict:
    """The report's part on the old task: its test accuracy before and after (the forgetting)."""
    before_acc, after_acc = accuracy(before, old_test.labels), accuracy(after, old_test.labels)
    return {
        "dataset": dataset, "test_images": len(old_test), "classes": old_test.num_classes,
        "before_acc": before_acc, "after_acc": after_acc, "forgetting": before_acc - after_acc,
        "agreement": accuracy(after, before),  # top-1 of the old head after vs before
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def markdown(r: dict) -> str:
    new, old = r["new_task"], r["old_task"]
    tested = "no test set" if new["test"] is None else f"{new['test_images']} test images"
    lines = [
        f"# b2kd adapt: {len(r['classes'])} new classes from {r['shots']} shot(s) each",
        "",
        f"- run: {r['run']} ({r['student']} student, {r['features']} penultimate features)",
        (f"- new task: {', '.join(r['classes'])}; {r['train_images']} training images drawn (seed"
         f" {r['seed']}) from {r['labelled_images']} in {r['labelled']}"),
        f"- queries: {r['queries']} (no teacher opened, no image sent; the run's ledger untouched)",
        f"- hardware: {r['hardware']}",
        "",
        f"| new task ({tested}) | accuracy |",
        "|---|---|",
        f"| chance | {_pct(new['chance'])} |",
        f"| new head, body frozen | {_pct(new['head_acc'])} |",
        f"| + fine-tuning | {_pct(new['finetuned_acc'])} |",
        "",
        f"| old task ({old['dataset']} test split, {old['test_images']} images) | accuracy |",
        "|---|---|",
        f"| distilled student (before) | {_pct(old['before_acc'])} |",
        f"| adapted student, old head (after) | {_pct(old['after_acc'])} |",
        f"| forgetting (before - after) | {_pct(old['forgetting'])} |",
        f"| top-1 agreement, after vs before | {_pct(old['agreement'])} |",
        "",
        r["export"] + ".",
    ]
    return "\n".join(lines) + "\n"
