"""End-to-end runs of every ``b2kd`` command through the real entry point, at toy scale.

A tiny .npz slice of MNIST (800 train / 200 test images) and a toy config make each stage
take a second or two. The teacher, generator and distillation runs are shared by the tests
of this module; the kill -9 test and the one-line-error test use real processes.
"""

from __future__ import annotations

import json
import shutil
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from toy import PLAIN_DISTILL, assert_trained_channels_last
from typer.testing import CliRunner

import b2kd
from b2kd.cli import app
from b2kd.core.checkpoint import read
from b2kd.core.config import load_config
from b2kd.edge import Ledger

N_TRAIN, N_TEST = 800, 200
BUDGET = 200
PIXELS = 28 * 28  # bytes sent per MNIST query
MAX_QUERIES = 40  # deprivatize.max_queries of the toy config
QUERY_BATCH = 64  # distill.query_batch of the toy config
BYTES_RECEIVED = {"soft": 4 * 10, "hard": 4}  # per response: float32 x 10 classes, one int32

# threads=1, not 2: with another CPU-bound process on a 2-core machine, 2 torch threads
# spin against each other (measured: 40 vs 3600 student images/s for the toy distillation).
TOY = {
    "threads": 1,
    "data": {"dataset": "npz", "local_fraction": 0.25},
    "teacher": {"arch": "lenet5", "epochs": 2},
    "deprivatize": {"epochs": 1, "widths": [16, 8], "max_queries": MAX_QUERIES,
                    "query_every": 2, "query_batch": 4},
    "distill": {"student": "lenet5", "budget": BUDGET, "epochs": 2, "batch_size": 32,
                "query_batch": QUERY_BATCH, **PLAIN_DISTILL},
}

# The installed console script (a real process for kill -9), else the same entry point via -m.
_SCRIPT = Path(sys.executable).with_name("b2kd")
B2KD = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "b2kd.cli"]
runner = CliRunner()


# --- helpers ------------------------------------------------------------------------------


def invoke(*args, env: dict | None = None):
    """Run ``b2kd ARGS`` in-process through the Typer app."""
    return runner.invoke(app, [str(a) for a in args], env=env)


def assert_ok(result) -> None:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output


def squash(text: str) -> str:
    """Text without whitespace: Rich wraps long lines at the console width."""
    return re.sub(r"\s+", "", text)


def assert_user_error(result, *needles: str) -> None:
    """A non-zero exit handled by the CLI (not a crash), an ``error:`` line, no traceback."""
    assert result.exit_code not in (0, 1), f"exit {result.exit_code}\n{result.output}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a crash
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), result.output
    assert not any(line.startswith("error:") for line in lines[1:]), result.output
    for needle in needles:
        assert squash(needle) in squash(result.stderr), result.output


def ledger_rows(path: Path) -> list[tuple[str, str]]:
    """(kind, stage) of every paid query, read straight from the SQLite file."""
    if not path.is_file():
        return []
    with sqlite3.connect(path) as db:
        return db.execute("SELECT kind, stage FROM queries ORDER BY id").fetchall()


def predictions_on_test_split(checkpoint: Path, npz: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 of the checkpoint's model, true labels) on the tiny set's test split, recomputed
    here from the files, to check what the reports say."""
    from b2kd.core.metrics import predict
    from b2kd.data import load_dataset
    from b2kd.models import load_classifier

    test = load_dataset("npz", "test", str(npz), 28, 1)
    model, _ = load_classifier(checkpoint)
    return predict(model, test.images), test.labels


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean())


def metric_epochs(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines()]


def subprocess_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "B2KD_DEBUG")}
    env["B2KD_CACHE"] = str(tmp / "cache")
    env["COLUMNS"] = "80"  # what Rich assumes when the output is not a terminal
    return env


# --- fixtures: a tiny dataset, a toy config, and the shared stage runs ---------------------


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """In-process runs set torch's thread count from the config; give the next module its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    from b2kd.data import load_dataset

    cache = os.environ.get("B2KD_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("B2KD_CACHE", cache)
        train = load_dataset("mnist", "train")
        test = load_dataset("mnist", "test")
    path = tmp_path_factory.mktemp("data") / "tiny-mnist.npz"
    np.savez(path, x_train=train.images[:N_TRAIN].numpy(), y_train=train.labels[:N_TRAIN].numpy(),
             x_test=test.images[:N_TEST].numpy(), y_test=test.labels[:N_TEST].numpy())
    return path


@pytest.fixture(scope="session")
def toy_config(tiny_npz, tmp_path_factory) -> Path:
    tree = json.loads(json.dumps(TOY))
    tree["data"]["root"] = str(tiny_npz)
    path = tmp_path_factory.mktemp("config") / "toy.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def teacher_run(toy_config, work):
    out = work / "teacher"
    result = invoke("teacher", "train", "--config", toy_config, "--out", out)
    assert_ok(result)
    return out, result


@pytest.fixture(scope="module")
def generator_run(toy_config, work, teacher_run):
    out = work / "deprivatize"
    result = invoke("deprivatize", "--config", toy_config,
                    "--teacher", teacher_run[0] / "teacher.pt", "--out", out)
    assert_ok(result)
    return out, result


def distill_args(toy_config, teacher_run, generator_run, response: str, out: Path, *extra) -> list:
    return ["distill", "--config", toy_config, "--teacher", teacher_run[0] / "teacher.pt",
            "--generator", generator_run[0] / "generator.pt", "--method", "mekd",
            "--response", response, "--budget", BUDGET, "--out", out, *extra]


@pytest.fixture(scope="module")
def distilled(toy_config, work, teacher_run, generator_run):
    """One soft and one hard MEKD run: {response: (run_dir, args, result)}."""
    runs = {}
    for response in ("soft", "hard"):
        out = work / f"distill-{response}"
        args = distill_args(toy_config, teacher_run, generator_run, response, out)
        result = invoke(*args)
        assert_ok(result)
        runs[response] = (out, args, result)
    return runs


# --- the stages ----------------------------------------------------------------------------


def test_teacher_train_writes_checkpoint_with_metadata_and_config(teacher_run, tiny_npz):
    out, result = teacher_run
    ckpt = read(out / "teacher.pt", "classifier")
    meta = ckpt["meta"]
    assert meta["arch"] == "lenet5"
    assert_trained_channels_last(ckpt["state_dict"])  # loaded in either layout (below)
    assert meta["dataset"] == "npz"
    assert meta["image_size"] == 28 and meta["channels"] == 1 and meta["num_classes"] == 10
    norm = meta["normalisation"]
    assert len(norm["mean"]) == 1 and len(norm["std"]) == 1 and norm["std"][0] > 0
    pred, labels = predictions_on_test_split(out / "teacher.pt", tiny_npz)
    assert meta["test_acc"] == agreement(pred, labels)  # the 200 test images, recomputed
    assert f"{100 * meta['test_acc']:.2f}%" in result.stdout
    cfg = load_config(out / "config.yaml")
    assert cfg.teacher.arch == "lenet5" and cfg.teacher.epochs == 2
    assert cfg.data.dataset == "npz" and cfg.data.root == str(tiny_npz)
    assert cfg.out == str(out)  # --out is recorded like every other option
    assert metric_epochs(out) == [0, 1]


def test_deprivatize_writes_generator_samples_and_ledger_without_private_images(
    generator_run, tiny_npz
):
    from PIL import Image

    out, _ = generator_run
    gen = read(out / "generator.pt", "generator")
    assert gen["meta"]["image_shape"] == [1, 28, 28]
    with Image.open(out / "images" / "generator_samples.png") as im:
        assert im.format == "PNG" and im.size == (8 * 30 + 2, 8 * 30 + 2)  # 8x8 grid, 2px pad
    with Ledger(out / "ledger.sqlite") as ledger:
        totals = ledger.totals()
        _, sent_images = ledger.images()
    assert 0 < totals["queries"] <= MAX_QUERIES
    assert totals["bytes_sent"] == totals["queries"] * PIXELS
    report = json.loads((out / "report.json").read_text())
    assert report["queries"] == totals["queries"]
    assert report["private_images_sent"] == 0
    assert {stage for _, stage in ledger_rows(out / "ledger.sqlite")} == {"deprivatize"}
    # Independent check: no image that went out equals any training image at all.
    train = np.load(tiny_npz)["x_train"].reshape(N_TRAIN, -1)
    train_bytes = {row.tobytes() for row in train}
    assert sent_images is not None and len(sent_images) == totals["queries"]
    assert not any(img.numpy().reshape(-1).tobytes() in train_bytes for img in sent_images)


@pytest.mark.parametrize("response", ["soft", "hard"])
def test_distill_pays_exactly_the_budget_and_reports(distilled, teacher_run, tiny_npz, response):
    out, _, result = distilled[response]
    assert "images/s" in result.stdout
    assert "privateimagessent0" in squash(result.stdout)

    pool = read(out / "pool.pt", "pool")
    assert pool["images"].dtype == torch.uint8
    assert tuple(pool["images"].shape) == (BUDGET, 1, 28, 28)
    for name in ("latest", "best"):
        ckpt = read(out / "checkpoints" / f"{name}.pt", "classifier")
        assert ckpt["config"]["arch"] == "lenet5"
        assert ckpt["meta"]["response"] == response
    assert read(out / "checkpoints" / "latest.pt")["meta"]["epoch"] == 1
    assert metric_epochs(out) == [0, 1]
    assert (out / "report.md").read_text().startswith(f"# b2kd report: mekd / {response}")

    report = json.loads((out / "report.json").read_text())
    assert report["response"] == response and report["budget"] == BUDGET
    # the accuracies are those of the checkpoints on the test split (the toy runs are at chance:
    # whether a student learns is test_learning.py's question)
    student_pred, labels = predictions_on_test_split(out / "checkpoints" / "best.pt", tiny_npz)
    teacher_pred, _ = predictions_on_test_split(teacher_run[0] / "teacher.pt", tiny_npz)
    assert report["student_acc"] == report["best"]["acc"] == agreement(student_pred, labels)
    assert report["fidelity"] == agreement(student_pred, teacher_pred)
    assert report["teacher_acc"] == agreement(teacher_pred, labels)
    assert report["queries"] == BUDGET
    assert report["bytes_sent"] == BUDGET * PIXELS
    assert report["bytes_received"] == BUDGET * BYTES_RECEIVED[response]
    assert report["private_images_sent"] == 0
    rows = ledger_rows(out / "ledger.sqlite")
    assert rows == [(response, "distill")] * BUDGET

    # how the teacher labelled the paid pool: the ledger's answers, counted here independently
    with Ledger(out / "ledger.sqlite") as ledger:
        answers = torch.stack(list(ledger.lookup(list(ledger.sent_hashes()), response).values()))
    counts = torch.bincount(answers.argmax(1), minlength=10).tolist()
    labels_report = report["pool_labels"]
    assert labels_report["counts"] == counts and labels_report["answers"] == BUDGET
    thin = [k for k in range(10) if counts[k] < 0.25 * BUDGET / 10]
    assert labels_report["thin_classes"] == thin
    assert ("warning: thin" in result.stdout) == bool(thin)
    md = (out / "report.md").read_text()
    assert "## How the teacher labelled the paid pool" in md and "not test accuracy" in md
    assert all(f"| {k} | {c} | {100 * c / BUDGET:.2f}% |" in md for k, c in enumerate(counts))


def test_rerunning_a_finished_distillation_pays_and_trains_nothing(distilled):
    out, args, _ = distilled["soft"]
    metrics_before = (out / "metrics.jsonl").read_text()
    latest_before = (out / "checkpoints" / "latest.pt").stat().st_mtime_ns
    result = invoke(*args)
    assert_ok(result)
    with Ledger(out / "ledger.sqlite") as ledger:
        assert ledger.totals()["queries"] == BUDGET
    assert (out / "metrics.jsonl").read_text() == metrics_before  # no epoch trained again
    assert (out / "checkpoints" / "latest.pt").stat().st_mtime_ns == latest_before
    assert "images/s" not in result.stdout  # nothing was trained, so no throughput
    assert json.loads((out / "report.json").read_text())["queries"] == BUDGET


def test_kill_9_then_rerun_resumes_without_paying_twice(
    toy_config, work, teacher_run, generator_run, tmp_path
):
    epochs = 30
    out = work / "killed"
    args = distill_args(toy_config, teacher_run, generator_run, "soft", out,
                        f"distill.epochs={epochs}")
    cmd = [*B2KD, *map(str, args)]
    env = subprocess_env(tmp_path)
    latest = out / "checkpoints" / "latest.pt"
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        try:
            deadline = time.monotonic() + 120
            while not latest.is_file():
                assert proc.poll() is None, (tmp_path / "first.log").read_text()
                assert time.monotonic() < deadline, "distill never wrote checkpoints/latest.pt"
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # latest.pt is written atomically: whole, and before the last epoch (metrics.jsonl may lag
    # it by one line when the kill lands between the two writes; resume rewrites it)
    assert 0 <= read(latest, "classifier")["meta"]["epoch"] < epochs - 1
    with Ledger(out / "ledger.sqlite") as ledger:
        assert ledger.totals()["queries"] == BUDGET  # the pool is paid before training starts

    second = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Traceback" not in second.stdout + second.stderr
    assert "resuming distillation at epoch" in second.stdout
    assert "images/s" in second.stdout
    rows = ledger_rows(out / "ledger.sqlite")
    assert rows == [("soft", "distill")] * BUDGET  # exactly the budget, nothing paid twice
    assert sorted(metric_epochs(out)) == list(range(epochs))  # every epoch exactly once
    assert read(latest, "classifier")["meta"]["epoch"] == epochs - 1
    report = json.loads((out / "report.json").read_text())
    assert report["queries"] == BUDGET and report["private_images_sent"] == 0


# --- the budget ----------------------------------------------------------------------------


def copy_ledger(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


def test_distill_over_budget_is_a_clear_error_and_keeps_paid_rows(
    toy_config, work, teacher_run, generator_run, distilled, tmp_path
):
    # The soft run's 200 paid queries leave nothing of a 200 budget for hard responses.
    out = tmp_path / "hard-after-soft"
    copy_ledger(distilled["soft"][0] / "ledger.sqlite", out / "ledger.sqlite")
    result = invoke(*distill_args(toy_config, teacher_run, generator_run, "hard", out))
    assert_user_error(result, "budget")
    assert ledger_rows(out / "ledger.sqlite") == [("soft", "distill")] * BUDGET
    assert not (out / "checkpoints").exists()

    # The deprivatize stage's queries fill part of the budget: the pool cannot all be paid,
    # so it is refused up front and nothing of it is sent.
    out = tmp_path / "after-deprivatize"
    dep_ledger = generator_run[0] / "ledger.sqlite"
    copy_ledger(dep_ledger, out / "ledger.sqlite")
    already = len(ledger_rows(dep_ledger))
    assert already > 0
    result = invoke(*distill_args(toy_config, teacher_run, generator_run, "soft", out))
    assert_user_error(result, "budget")
    assert ledger_rows(out / "ledger.sqlite") == [("soft", "deprivatize")] * already
    assert not (out / "checkpoints").exists()


# --- evaluate ------------------------------------------------------------------------------


def test_evaluate_recreates_the_reports(distilled):
    out = distilled["hard"][0]
    before = json.loads((out / "report.json").read_text())
    (out / "report.json").unlink()
    (out / "report.md").unlink()
    result = invoke("evaluate", out)
    assert_ok(result)
    after = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file()
    for key in ("student_acc", "fidelity", "teacher_acc", "queries", "bytes_sent",
                "private_images_sent", "response", "budget"):
        assert after[key] == before[key], key
    assert after["best"]["epoch"] == before["best"]["epoch"]
    assert after["pool_labels"] == before["pool_labels"]
    assert ("warning: thin" in result.stdout) == bool(after["pool_labels"]["thin_classes"])


def test_a_run_written_by_a_newer_b2kd_names_both_versions(distilled, tmp_path):
    """A run's config.yaml names the b2kd that wrote it; one with keys this version does not know
    is one line naming that version, this one and the keys, and nothing is rewritten."""
    run = tmp_path / "newer"
    shutil.copytree(distilled["soft"][0], run)
    tree = yaml.safe_load((run / "config.yaml").read_text())
    assert tree["b2kd_version"] == b2kd.__version__
    tree["b2kd_version"] = "9.0.0"
    tree["distill"]["shiny_lever"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    before = (run / "report.json").read_bytes()
    result = invoke("evaluate", run)
    assert_user_error(result, "written by b2kd 9.0.0")
    assert f"b2kd {b2kd.__version__} does not know: distill.shiny_lever" in result.output
    assert (run / "report.json").read_bytes() == before


def test_evaluate_on_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("evaluate", tmp_path / "empty")
    assert_user_error(result, "no config.yaml")


# --- user errors ---------------------------------------------------------------------------


USER_ERRORS = {
    # case: (extra distill args, text the error must contain, whether nothing may be paid)
    "missing-teacher": (["--teacher", "{tmp}/missing/teacher.pt"], "checkpoint not found", True),
    "unknown-response": (["--response", "probs"], "unknown response kind 'probs'", True),
    "unknown-student": (["--student", "nosuchnet"], "unknown architecture 'nosuchnet'", False),
    "bad-override": (["distill.nonsense=1"], "distill.nonsense", True),
    "missing-config": (["--config", "{tmp}/missing.yaml"], "config file not found", True),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_are_one_clear_line(case, toy_config, teacher_run, generator_run, tmp_path):
    extra, needle, nothing_paid = USER_ERRORS[case]
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    out = tmp_path / "run"
    # later options win: the case's --teacher/--response/--config replace the good ones
    args = distill_args(toy_config, teacher_run, generator_run, "soft", out, *extra)
    result = invoke(*args)
    assert_user_error(result, needle)
    if nothing_paid:
        assert ledger_rows(out / "ledger.sqlite") == []
    assert not (out / "checkpoints").exists()


def test_unknown_student_is_refused_before_any_query(
    toy_config, teacher_run, generator_run, tmp_path
):
    out = tmp_path / "run"
    result = invoke(*distill_args(toy_config, teacher_run, generator_run, "soft", out,
                                  "--student", "nosuchnet"))
    assert_user_error(result, "unknown architecture")
    assert ledger_rows(out / "ledger.sqlite") == []


def test_long_error_is_a_single_line_when_piped(tmp_path):
    not_a_run = tmp_path / ("a-rather-long-directory-name-" * 3)
    not_a_run.mkdir()
    proc = subprocess.run([*B2KD, "evaluate", str(not_a_run)], check=False,
                          stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --- demo ----------------------------------------------------------------------------------


def test_demo_at_toy_scale_reports_and_reuses_the_cached_teacher(toy_config, tmp_path):
    out = tmp_path / "demo"
    overrides = [f"distill.budget={BUDGET}", "distill.epochs=1"]
    first = invoke("demo", "--config", toy_config, "--out", out, *overrides)
    assert_ok(first)
    assert "reusing cached teacher" not in first.stdout
    for text in ("b2kd demo", "teacher", "deprivatize", "MEKD soft", "MEKD hard", "test acc",
                 "edge deliverable", "INT8 acc", "near-copies"):
        assert text in first.stdout, text
    report = json.loads((out / "report.json").read_text())
    assert report["teacher_acc"] == read(out / "teacher" / "teacher.pt")["meta"]["test_acc"]
    assert 0 < report["deprivatize_queries"] <= MAX_QUERIES
    assert report["deprivatize_private_images_sent"] == 0
    assert report["budget"] == BUDGET
    for response in ("soft", "hard"):
        r = report[response]
        run_report = json.loads((out / response / "report.json").read_text())
        assert r["student_acc"] == run_report["student_acc"]
        assert r["fidelity"] == run_report["fidelity"]
        assert run_report["teacher_acc"] == report["teacher_acc"]
        assert 0 < r["queries"] <= BUDGET
        # the demo queries a real server: 1 byte per pixel plus each request's JSON header
        assert r["queries"] * PIXELS < r["bytes_sent"] <= r["queries"] * PIXELS * 1.05
        assert r["private_images_sent"] == 0
        # the edge deliverable and the audit of what was sent
        # the exported fp32 model is the best student (numpy float64 against torch float32)
        assert r["fp32_acc"] == pytest.approx(r["student_acc"], abs=1e-6)
        assert abs(r["int8_acc"] - r["fp32_acc"]) <= 0.05 and r["int8_latency_ms_p50"] > 0
        assert 0 < r["int8_bytes"] <= 0.30 * r["fp32_bytes"]
        assert r["near_copy_fraction"] == 0.0
        assert (out / response / "student.int8.onnx").stat().st_size == r["int8_bytes"]
        assert "PASS" in json.loads((out / response / "audit.json").read_text())["verdict"]
        assert r["seconds"] > 0
        assert metric_epochs(out / response) == [0]  # the distill.epochs=1 override reached it
        rows = ledger_rows(out / response / "ledger.sqlite")
        assert rows == [(response, "distill")] * r["queries"]
        served = (out / "serve" / response / "access.log").read_text()  # went through `b2kd serve`
        assert '"path": "/v2/models/teacher/infer", "status": 200' in served

    teacher_mtime = (out / "teacher" / "teacher.pt").stat().st_mtime_ns
    second = invoke("demo", "--config", toy_config, "--out", out, *overrides)
    assert_ok(second)
    assert "reusing cached teacher" in second.stdout
    assert (out / "teacher" / "teacher.pt").stat().st_mtime_ns == teacher_mtime
    again = json.loads((out / "report.json").read_text())
    assert again["deprivatize_queries"] == report["deprivatize_queries"]  # nothing paid twice
    for response in ("soft", "hard"):
        assert again[response]["queries"] == report[response]["queries"]
        assert metric_epochs(out / response) == [0]  # not trained again
