"""``b2kd demo``: the whole story on MNIST, offline, on a CPU.

teacher (trained once, then reused) -> deprivatize on the 10% private set ->
MEKD with soft and with hard responses, each within its own query budget ->
test-set evaluation -> one table and ``report.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from b2kd.checkpoint import CheckpointError, read
from b2kd.config import Config
from b2kd.pipeline import run_deprivatize, run_distill, run_evaluate, run_teacher
from b2kd.teacher_train import trained_with

RESPONSES = ("soft", "hard")


def _cached_teacher(cfg: Config, path: Path) -> dict | None:
    """The metadata of a teacher already trained with this config, or None."""
    try:
        meta = read(path, "classifier")["meta"]
    except CheckpointError:
        return None
    return meta if meta.get("trained_with") == trained_with(cfg) else None


def run_demo(cfg: Config, out: Path, console: Console) -> dict:
    log = console.print
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    teacher_path = out / "teacher" / "teacher.pt"
    meta = _cached_teacher(cfg, teacher_path)
    if meta is None:
        console.rule("1. teacher (the cloud's model)")
        meta = run_teacher(cfg, out / "teacher", log)
    else:
        log(f"reusing cached teacher {teacher_path}")
    seconds["teacher"] = time.perf_counter() - start
    cfg.teacher.checkpoint = str(teacher_path)

    console.rule("2. deprivatize (GAN on the private images)")
    start = time.perf_counter()
    dep = run_deprivatize(cfg, out / "deprivatize", log)
    seconds["deprivatize"] = time.perf_counter() - start
    cfg.deprivatize.generator = dep["generator"]

    report: dict = {
        "teacher_acc": meta["test_acc"],
        "teacher_arch": meta["arch"],
        "student_arch": cfg.distill.student,
        "deprivatize_queries": dep["queries"],
        "deprivatize_bytes_sent": dep["bytes_sent"],
        "deprivatize_private_images_sent": dep["private_images_sent"],
        "budget": cfg.distill.budget,
        "seconds": seconds,
    }
    for response in RESPONSES:
        console.rule(f"3. distill: MEKD, {response} responses, budget {cfg.distill.budget}")
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.distill.response = response
        start = time.perf_counter()
        run_distill(run_cfg, out / response, log)
        result = run_evaluate(out / response, run_cfg)
        elapsed = time.perf_counter() - start
        seconds[f"distill_{response}"] = elapsed
        report[response] = {
            "student_acc": result["student_acc"],
            "student_acc_last": result["latest"]["acc"],
            "fidelity": result["fidelity"],
            "queries": result["queries"],
            "bytes_sent": result["bytes_sent"],
            "bytes_received": result["bytes_received"],
            "private_images_sent": result["private_images_sent"],
            "seconds": elapsed,
        }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    console.print(summary_table(report))
    log(f"report -> {out / 'report.json'}")
    return report


def summary_table(report: dict) -> Table:
    table = Table(title=f"b2kd demo: MNIST, teacher {report['teacher_arch']} -> student {report['student_arch']}")
    for col in ("stage", "test acc", "fidelity", "queries", "MB sent", "private sent", "wall s"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    s = report["seconds"]
    table.add_row("teacher", f"{100 * report['teacher_acc']:.2f}%", "-", "-", "-", "-", f"{s['teacher']:.0f}")
    table.add_row("deprivatize", "-", "-", str(report["deprivatize_queries"]),
                  f"{report['deprivatize_bytes_sent'] / 1e6:.2f}",
                  str(report["deprivatize_private_images_sent"]), f"{s['deprivatize']:.0f}")
    for response in RESPONSES:
        r = report[response]
        table.add_row(f"MEKD {response}", f"{100 * r['student_acc']:.2f}%", f"{100 * r['fidelity']:.2f}%",
                      str(r["queries"]), f"{r['bytes_sent'] / 1e6:.2f}", str(r["private_images_sent"]),
                      f"{r['seconds']:.0f}")
    return table
