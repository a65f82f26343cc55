"""``b2kd demo``: the whole story on the configured dataset (MNIST in configs/demo.yaml), offline, on a CPU.

teacher (trained once, then reused) -> served by ``b2kd serve`` on 127.0.0.1,
one server per response kind, every query over HTTP -> deprivatize on the 10% private set ->
MEKD with soft and with hard responses, each within its own query budget ->
test-set evaluation -> ONNX fp32/INT8 export and an audit of what was sent ->
two tables and ``report.json``.
"""

from __future__ import annotations

import json
import secrets
import time
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.table import Table

from b2kd.core.checkpoint import CheckpointError, read
from b2kd.core.config import Config
from b2kd.core.run_dir import check_writable
from b2kd.deploy.export import export_run
from b2kd.evaluate.audit import audit_run
from b2kd.pipeline import run_deprivatize, run_distill, run_evaluate, run_teacher
from b2kd.provider.serve import ServedTeacher
from b2kd.teacher.train import trained_with

RESPONSES = ("soft", "hard")


def _cached_teacher(cfg: Config, path: Path) -> dict | None:
    """The metadata of a teacher already trained with this config, or None."""
    try:
        meta = read(path, "classifier")["meta"]
    except CheckpointError:
        return None
    return meta if meta.get("trained_with") == trained_with(cfg) else None


def _serve_locally(cfg: Config, out: Path, servers: ExitStack, log) -> dict[str, str]:
    """Start ``b2kd serve`` per response kind (a provider's tiers) behind one fresh API key."""
    kinds = dict.fromkeys([cfg.deprivatize.response, *RESPONSES])
    cfg.teacher.api_key = secrets.token_urlsafe(16)
    # every run serves the one local checkpoint (its SHA-256 is what the run directories record,
    # b2kd.core.run_dir) on new ports: the ledgers' answers come from one teacher at whatever URL
    cfg.teacher.allow_mixed_providers = True
    started = {k: ServedTeacher(cfg.teacher.checkpoint, out / "serve" / k.replace(":", "-"), k,
                                api_keys=(cfg.teacher.api_key,), threads=cfg.threads).start() for k in kinds}
    for server in started.values():
        servers.callback(server.stop)  # stopped at the end, also on error
    urls = {k: server.wait().url for k, server in started.items()}
    log("teacher API: " + ", ".join(f"{k} at {url}" for k, url in urls.items()))
    return urls


def _served_elsewhere(cfg: Config) -> dict[str, str]:
    """A teacher at ``teacher.url``: its one response kind is what every stage asks for."""
    from b2kd.edge.client import HTTPTeacher

    with HTTPTeacher.from_config(cfg.teacher) as api:
        kind = str(api.kind)
    cfg.deprivatize.response = kind
    return {kind: cfg.teacher.url}


def run_demo(cfg: Config, out: Path, console: Console) -> dict:
    """The demo; the teacher servers it starts are stopped when it ends, also on error."""
    check_writable(out)  # before a server or a stage writes under it
    with ExitStack() as servers:
        return _run_stages(cfg, out, console, servers)


def _run_stages(cfg: Config, out: Path, console: Console, servers: ExitStack) -> dict:
    log = console.print
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    teacher_path = out / "teacher" / "teacher.pt"
    if cfg.teacher.url:  # served elsewhere: no local copy, so no teacher accuracy or fidelity
        meta = {"test_acc": None, "arch": "served"}
        urls = _served_elsewhere(cfg)
    else:
        meta = _cached_teacher(cfg, teacher_path)
        if meta is None:
            console.rule("1. teacher (the cloud's model)")
            meta = run_teacher(cfg, out / "teacher", log)
        else:
            log(f"reusing cached teacher {teacher_path}")
        cfg.teacher.checkpoint = str(teacher_path)
        urls = _serve_locally(cfg, out, servers, log)
    seconds["teacher"] = time.perf_counter() - start
    responses = [r for r in urls if r in RESPONSES] or list(urls)

    console.rule("2. deprivatize (GAN on the private images)")
    start = time.perf_counter()
    cfg.teacher.url = urls[cfg.deprivatize.response]
    dep = run_deprivatize(cfg, out / "deprivatize", log)
    seconds["deprivatize"] = time.perf_counter() - start
    cfg.deprivatize.generator = dep["generator"]

    report: dict = {
        "dataset": cfg.data.dataset,
        "teacher_acc": meta["test_acc"],
        "teacher_arch": meta["arch"],
        "student_arch": cfg.distill.student,
        "deprivatize_queries": dep["queries"],
        "deprivatize_bytes_sent": dep["bytes_sent"],
        "deprivatize_bytes_received": dep["bytes_received"],
        "responses": responses,
        "deprivatize_private_images_sent": dep["private_images_sent"],
        "budget": cfg.distill.budget,
        "seconds": seconds,
    }
    for response in responses:
        console.rule(f"3. distill: MEKD, {response} responses, budget {cfg.distill.budget}")
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.distill.response = response
        run_cfg.teacher.url = urls[response]
        start = time.perf_counter()
        run_distill(run_cfg, out / response, log)
        result = run_evaluate(out / response, run_cfg)
        elapsed = time.perf_counter() - start
        seconds[f"distill_{response}"] = elapsed
        start = time.perf_counter()
        exported = export_run(out / response, log=log)["models"]
        audited = audit_run(out / response)
        log(audited["verdict"], markup=False, highlight=False)
        seconds[f"export_audit_{response}"] = time.perf_counter() - start
        report[response] = {
            "student_acc": result["student_acc"],
            "student_acc_last": result["latest"]["acc"],
            "fidelity": result["fidelity"],
            "queries": result["queries"],
            "bytes_sent": result["bytes_sent"],
            "bytes_received": result["bytes_received"],
            "private_images_sent": result["private_images_sent"],
            "seconds": elapsed,
            "fp32_acc": exported["fp32"]["acc"],
            "int8_acc": exported["int8"]["acc"],
            "fp32_bytes": exported["fp32"]["bytes"],
            "int8_bytes": exported["int8"]["bytes"],
            "int8_latency_ms_p50": exported["int8"]["latency_ms_p50"],
            "near_copy_fraction": audited["near_copy_fraction"],
        }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    console.print(summary_table(report))
    console.print(edge_table(report))
    log(f"report -> {out / 'report.json'}")
    return report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _mb(sent: int, received: int) -> str:
    """MB sent/received on the wire, narrow enough for an 80-column table."""
    return f"{sent / 1e6:.1f}/{received / 1e6:.2f}"


#: How the demo's tables name the datasets people know by another spelling.
DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10",
                 "cifar100": "CIFAR-100", "svhn": "SVHN"}


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def summary_table(report: dict) -> Table:
    table = Table(title=f"b2kd demo: {dataset_name(report.get('dataset', 'mnist'))}, teacher"
                        f" {report['teacher_arch']} -> student {report['student_arch']}")
    for col in ("stage", "test acc", "fidelity", "queries", "MB sent/recv", "private sent", "wall s"):
        # the stage names stay whole; numeric columns wrap their headers on narrow terminals
        table.add_column(col, justify="right" if col != "stage" else "left", no_wrap=col == "stage")
    s = report["seconds"]
    table.add_row("teacher", _pct(report["teacher_acc"]), "-", "-", "-", "-", f"{s['teacher']:.0f}")
    table.add_row("deprivatize", "-", "-", str(report["deprivatize_queries"]),
                  _mb(report["deprivatize_bytes_sent"], report["deprivatize_bytes_received"]),
                  str(report["deprivatize_private_images_sent"]), f"{s['deprivatize']:.0f}")
    for response in report["responses"]:
        r = report[response]
        table.add_row(f"MEKD {response}", _pct(r["student_acc"]), _pct(r["fidelity"]), str(r["queries"]),
                      _mb(r["bytes_sent"], r["bytes_received"]), str(r["private_images_sent"]),
                      f"{r['seconds']:.0f}")
    return table


def edge_table(report: dict) -> Table:
    """The deliverable and the privacy check: ONNX fp32 vs INT8, and near-copies among the images sent."""
    table = Table(title="edge deliverable (onnxruntime CPU, 1 thread) and audit of what was sent")
    for col in ("student", "fp32 acc", "INT8 acc", "fp32 KB", "INT8 KB", "INT8 ms", "near-copies"):
        table.add_column(col, justify="right" if col != "student" else "left")
    for response in report["responses"]:
        r = report[response]
        table.add_row(f"MEKD {response}", _pct(r["fp32_acc"]), _pct(r["int8_acc"]),
                      f"{r['fp32_bytes'] / 1024:.0f}", f"{r['int8_bytes'] / 1024:.0f}",
                      f"{r['int8_latency_ms_p50']:.3f}", _pct(r["near_copy_fraction"]))
    return table
