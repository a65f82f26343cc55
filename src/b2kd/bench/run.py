"""`b2kd bench`: every method on the same teacher, private set and query accounting.

A bench file names a base run config and a matrix: methods x response kinds x
query budgets x seeds, optionally under several distribution gaps. Every cell
is an ordinary `b2kd distill` run directory under ``OUT/cells``; a finished
cell (its ``result.json``) is read back, not re-run, and a failed cell is
recorded and the rest go on. Before anything runs, every cell and shared GAN
already in OUT is checked against the settings the bench file gives it now
(:mod:`b2kd.bench.reuse`): a stale one is an error, never silently reused.

Budget sweeps reuse paid responses. Pools nest (a smaller budget's pool is a
prefix of a larger one's with the same seed), and every cell of one gap and
seed shares one response ledger (``teacher.shared_cache``): an image answered
once is served free to every later cell, so a sweep pays for its largest pool
only. Each cell's own ledger still counts every query it used, as if it had
paid alone; ``paid_queries`` in the summary is what the sweep really paid.
"""

from __future__ import annotations

import csv
import json
import time
import traceback
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from b2kd.bench.reuse import GAN_KEYS, TEACHER_KEYS, check_reuse, mismatch
from b2kd.core.config import ConfigError, load_config
from b2kd.distill.methods import get_method

FIELDS = [
    "gap", "method", "white_box", "response", "budget", "seed", "status", "teacher_acc",
    "student_acc", "student_acc_last", "dev_acc", "fidelity", "queries", "bytes_sent", "bytes_received",
    "setup_queries", "seconds", "hardware", "error", "synthetic_gap", "gap_per_class",
]


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    responses: list[str] = ["soft"]
    set: dict[str, Any] = {}  # overrides for this method's cells only
    # overrides for one response's cells, e.g. {soft: {distill.balance_realism: 0.5}}; distill.*
    # keys only, since the method's responses share one GAN per gap and seed
    by_response: dict[str, dict[str, Any]] = {}


class GapSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "none"
    set: dict[str, Any] = {}  # e.g. {data.private_shift: imbalance}


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: str  # the run config every cell starts from (relative to the bench file)
    out: str = "runs/bench"
    teacher: str | None = None  # an existing teacher checkpoint; else trained into OUT/teacher
    set: dict[str, Any] = {}  # overrides for every cell
    methods: list[MethodSpec] = Field(min_length=1)
    budgets: list[int] = Field(min_length=1)
    seeds: list[int] = [0]
    gaps: list[GapSpec] = [GapSpec()]



def _gap_fields(table: dict | None) -> dict:
    """A cell's synthetic-to-real distance (b2kd.evaluate.synthetic_gap): the mean gap in points, and per class."""
    if table is None or table.get("mean_gap") is None:
        return {"synthetic_gap": None, "gap_per_class": ""}
    per_class = " ".join("-" if g is None else f"{100 * g:.1f}" for g in table["gap"])
    return {"synthetic_gap": 100 * table["mean_gap"], "gap_per_class": per_class}

def load_bench(path: str | Path) -> tuple[BenchConfig, Path]:
    """The bench file, validated (unknown methods and bad keys refused up front), and its base path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bench file not found: {path}")
    try:
        bench = BenchConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as error:
        raise ConfigError(f"{path}: invalid bench file: {error}") from None
    base = (path.parent / bench.base).resolve() if not Path(bench.base).is_absolute() else Path(bench.base)
    for spec in bench.methods:
        try:
            get_method(spec.name)
        except ValueError as error:
            raise ConfigError(f"{path}: {error}") from None
    for budget in bench.budgets:
        if budget < 1:
            raise ConfigError(f"{path}: budgets must be positive, got {budget}")
    for spec in bench.methods:
        for response, options in spec.by_response.items():
            if response not in spec.responses:
                raise ConfigError(f"{path}: {spec.name}'s by_response names '{response}', which is not"
                                  f" among its responses {spec.responses}")
            other = [key for key in options if not key.startswith("distill.")]
            if other:
                raise ConfigError(f"{path}: {spec.name}'s by_response may set distill.* keys only"
                                  f" (its responses share one GAN), got {other}")
    methods = [spec.name for spec in bench.methods]
    if len(set(methods)) != len(methods):
        raise ConfigError(f"{path}: a method is listed more than once: {methods}")
    names = [g.name for g in bench.gaps]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: gap names must be distinct, got {names}")
    # every cell's config must be valid before anything runs
    for gap in bench.gaps:
        for spec in bench.methods:
            for response in spec.responses:
                cell_config(bench, base, gap, spec, response, bench.budgets[0], bench.seeds[0], None, None)
    return bench, base


def cell_config(bench: BenchConfig, base: Path, gap: GapSpec, spec: MethodSpec, response: str,
                budget: int, seed: int, teacher: str | None, generator: str | None, shared: str | None = None):
    options = {**bench.set, **gap.set, **spec.set, **spec.by_response.get(response, {}),
               "distill.method": spec.name,
               "distill.response": response, "distill.budget": budget, "seed": seed}
    if teacher:
        options["teacher.checkpoint"] = teacher
    options["deprivatize.generator"] = generator
    options["teacher.shared_cache"] = shared
    return load_config(base, options)


def _cell_name(spec: MethodSpec, response: str, budget: int, seed: int) -> str:
    return f"{spec.name}-{response.replace(':', '')}-{budget}-s{seed}"


def prepare_bench(path: str | Path, out: str | Path | None, log=print, train_teacher=None):
    """The validated bench, its base config path, its directory and its teacher checkpoint
    (trained into OUT/teacher first when none is given: by ``train_teacher(cfg, dir)`` if set)."""
    bench, base = load_bench(path)
    out = Path(out or bench.out).resolve()  # absolute: cells may run in other processes
    # the one teacher of every cell: the base config with the bench's `set`, at the base's own seed,
    # so that it does not depend on which seeds, gaps or methods the bench lists
    base_cfg = load_config(base, bench.set)
    given = bench.teacher or base_cfg.teacher.checkpoint
    teacher = given or str(out / "teacher" / "teacher.pt")
    # nothing runs (and bench.yaml is not overwritten) if OUT holds work made with other settings
    check_reuse(stale_dirs(bench, base, out, teacher, None if given else base_cfg))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.yaml").write_text(yaml.safe_dump(bench.model_dump(), sort_keys=False))

    if not given:
        if not Path(teacher).is_file():
            from b2kd.pipeline import run_teacher

            log("training the teacher once for every cell")
            (train_teacher or (lambda cfg, d: run_teacher(cfg, d, log=lambda *_: None)))(base_cfg, out / "teacher")
    if not Path(teacher).is_file():
        raise ConfigError(f"teacher checkpoint not found: {teacher}")
    return bench, base, out, str(Path(teacher).resolve())


def stale_dirs(bench: BenchConfig, base: Path, out: Path, teacher: str, teacher_cfg=None) -> list[str | None]:
    """Why each earlier teacher (when trained into OUT: ``teacher_cfg``), GAN and cell directory
    of OUT may not be reused by the bench as it is now (None for those that may, or do not exist)."""
    problems = [mismatch(out / "teacher", teacher_cfg, TEACHER_KEYS)] if teacher_cfg is not None else []
    for gap in bench.gaps:
        for seed in bench.seeds:
            if uses_generator(bench) and gan_dir(out, gap, seed).is_dir():
                made = cell_config(bench, base, gap, MethodSpec(name="mekd"), "soft", bench.budgets[0], seed,
                                   teacher, None)  # as _generator makes it
                problems.append(mismatch(gan_dir(out, gap, seed), made, GAN_KEYS))
            for spec, response, budget, cell, _ in plan(bench, out, gap, seed):
                if cell.is_dir():
                    now = cell_config(bench, base, gap, spec, response, budget, seed, teacher, None)
                    problems.append(mismatch(cell, now))
    return problems


def uses_generator(bench: BenchConfig) -> bool:
    return any(get_method(s.name).source == "generator" for s in bench.methods)


def gan_dir(out: Path, gap: GapSpec, seed: int) -> Path:
    return out / "shared" / gap.name / f"gan-s{seed}"


def shared_ledger(out: Path, gap: GapSpec, seed: int) -> str:
    return str(out / "shared" / gap.name / f"paid-s{seed}.sqlite")


def plan(bench: BenchConfig, out: Path, gap: GapSpec, seed: int):
    """The cells of one gap and seed in the bench's order: (spec, response, budget, cell dir, row)."""
    from b2kd.core.runtime import hardware

    for spec in bench.methods:
        method = get_method(spec.name)
        for response in spec.responses:
            for budget in sorted(bench.budgets):
                cell = out / "cells" / gap.name / _cell_name(spec, response, budget, seed)
                row = {"gap": gap.name, "method": spec.name, "white_box": method.white_box,
                       "response": response, "budget": budget, "seed": seed, "hardware": hardware()}
                yield spec, response, budget, cell, row


def run_cell(bench: BenchConfig, base: Path, gap: GapSpec, spec: MethodSpec, response: str, budget: int,
             seed: int, teacher: str, generator: str | None, setup_queries: int, cell: Path, row: dict,
             log=print) -> dict:
    """Distil and evaluate one cell; its row (also written to ``cell/result.json`` when it
    succeeds). A failure is recorded in the row and ``cell/error.txt``, never raised."""
    from b2kd.core.runtime import hardware
    from b2kd.pipeline import run_distill, run_evaluate

    out = cell.parents[2]
    uses_gan = get_method(spec.name).source == "generator"
    start = time.perf_counter()
    try:
        cfg = cell_config(bench, base, gap, spec, response, budget, seed, teacher,
                          generator if uses_gan else None, shared_ledger(out, gap, seed))
        summary = run_distill(cfg, cell, log=lambda *_: None)
        report = run_evaluate(cell, cfg)
    except Exception as error:  # noqa: BLE001 - a failed cell must not stop the rest
        message = f"{type(error).__name__}: {error}"
        log(f"FAILED {gap.name}/{cell.name}: {message}")
        (cell / "error.txt").parent.mkdir(parents=True, exist_ok=True)
        (cell / "error.txt").write_text(traceback.format_exc())
        return {**row, "status": "failed", "error": message, "hardware": hardware()}
    row.update(
        status="ok", hardware=hardware(),  # read after run_distill set the cell's threads
        teacher_acc=report["teacher_acc"], student_acc=report["student_acc"],
        student_acc_last=report["latest"]["acc"], dev_acc=report.get("dev_acc"),
        fidelity=report["fidelity"], **_gap_fields(report.get("synthetic_vs_real")),
        queries=summary["queries"], bytes_sent=summary["bytes_sent"],
        bytes_received=summary["bytes_received"],
        setup_queries=setup_queries if uses_gan else 0,
        seconds=time.perf_counter() - start, error="",
    )
    (cell / "result.json").write_text(json.dumps(row, indent=2))
    log(f"{gap.name}/{cell.name}: acc {row['student_acc']:.4f}"
        f" fidelity {row['fidelity'] if row['fidelity'] is not None else float('nan'):.4f}"
        f" queries {row['queries']} ({row['seconds']:.0f}s)")
    return row


def generator_of(bench, base, gap, seed, teacher, out: Path, log=print) -> tuple[str | None, int, str | None]:
    """(generator path, setup queries, error) of one gap and seed: trained once, shared by its cells."""
    from b2kd.pipeline import run_deprivatize

    if not uses_generator(bench):
        return None, 0, None
    try:
        generator, setup_queries = _generator(bench, base, gap, seed, teacher, gan_dir(out, gap, seed), log,
                                              run_deprivatize)
    except Exception as error:  # noqa: BLE001 - reported per cell, the bench goes on
        message = f"deprivatize failed: {type(error).__name__}: {error}"
        log(message)
        return None, 0, message
    return generator, setup_queries, None


def run_bench(path: str | Path, out: str | Path | None = None, log=print) -> tuple[Path, list[dict]]:
    """Run (or finish) every cell of the bench file; returns the bench directory and its rows
    (also written to results.csv and results.json there)."""
    bench, base, out, teacher = prepare_bench(path, out, log)
    rows: list[dict] = []
    for gap in bench.gaps:
        for seed in bench.seeds:
            generator, setup_queries, gan_error = generator_of(bench, base, gap, seed, teacher, out, log)
            for spec, response, budget, cell, row in plan(bench, out, gap, seed):
                done = cell / "result.json"
                if done.is_file():
                    rows.append(json.loads(done.read_text()))
                    continue
                if get_method(spec.name).source == "generator" and gan_error:
                    rows.append({**row, "status": "failed", "error": gan_error})
                    continue
                row = run_cell(bench, base, gap, spec, response, budget, seed, teacher, generator,
                               setup_queries, cell, row, log)
                rows.append(row)
                if row["status"] == "ok":
                    write_results(out, rows)
    write_results(out, rows)
    return out, rows


def _generator(bench, base, gap, seed, teacher, gan_dir: Path, log, run_deprivatize) -> tuple[str, int]:
    """The deprivatization generator of one gap and seed, trained once and shared by its cells."""
    path = gan_dir / "generator.pt"
    if not path.is_file():
        log(f"deprivatize: training the generator for gap '{gap.name}', seed {seed}")
        spec = MethodSpec(name="mekd")
        cfg = cell_config(bench, base, gap, spec, "soft", bench.budgets[0], seed, teacher, None)
        run_deprivatize(cfg, gan_dir, log=lambda *_: None)
    from b2kd.edge import Ledger

    with Ledger(gan_dir / "ledger.sqlite") as ledger:
        return str(path), ledger.count()


def write_results(out: Path, rows: list[dict]) -> None:
    """results.json and results.csv (one row per cell; accuracies as fractions)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(out / "results.json")
    with open(out / "results.csv.tmp", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.csv.tmp").replace(out / "results.csv")
