"""Data-parallel training under torchrun: 2 CPU processes with gloo against 1 process, kill -9, resume.

A LeNet-5 teacher is trained on a tiny MNIST slice by 2 processes (2 x 16 per batch) and by 1
(32). One 2-process distillation job is then run three times in the same run directory against
a real `b2kd serve` whose API keys have exact quotas (so a query paid twice would be refused):
(A) its key's quota runs out while rank 0 pays for the pool: both ranks stop with a clear
message; (B) with a key for the rest, rank 1 is killed (SIGKILL) mid-training; (C) the same
command again resumes and finishes. A 1-process run with the same seed and global batch (32 =
2 ranks x 16) is the reference. The method is KN, whose pool is real private digits; LeNet-5
has no BatchNorm, so 2 processes and 1 differ only by the order of float sums.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from toy import PLAIN_DISTILL

from b2kd.core.checkpoint import read
from b2kd.core.config import Config

BUDGET, EPOCHS = 200, 12
# a student distilled 2 x 16 and one distilled 1 x 32 agree to these tolerances (measured max
# abs difference of the final weights: 1.5e-7, float sums in another order over 72 SGD steps)
WEIGHT_ATOL, WEIGHT_RTOL = 1e-4, 1e-4
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "-m", "b2kd"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The worker of ``rank`` that torchrun started (read from its environment)."""
    for pid in _children(launcher):
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def _server_used(server_dir: Path, key: str) -> int:
    from b2kd.provider.keys import key_id, load_secret

    with sqlite3.connect(server_dir / "state.sqlite") as db:
        kid = key_id(key, load_secret(server_dir / "secret", create=False))
        return db.execute("SELECT used FROM keys WHERE key_id = ?", (kid,)).fetchone()[0]


def _ledger(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT hash, kind, bytes_sent, bytes_received, response, stage FROM queries"
                          " ORDER BY hash").fetchall()


def _teacher_config(root: Path) -> dict:
    """A tiny MNIST slice (800 train, 200 of them private; 200 test) and a LeNet-5 teacher that
    reaches about 70% on it, so that a student's accuracy means something."""
    import numpy as np

    from b2kd.data import load_dataset

    train, test = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    np.savez(root / "tiny.npz", x_train=train.images[:800].numpy(), y_train=train.labels[:800].numpy(),
             x_test=test.images[:200].numpy(), y_test=test.labels[:200].numpy())
    return {"threads": 1, "data": {"dataset": "npz", "root": str(root / "tiny.npz"), "local_fraction": 0.25},
            "teacher": {"arch": "lenet5", "epochs": 4, "batch_size": 32, "lr": 0.1},
            # KN (Knockoff): its pool is the private digits themselves (no generator needed)
            "distill": {"method": "kn", "student": "lenet5", "budget": BUDGET, "epochs": EPOCHS,
                        "batch_size": 32, "query_batch": 64, **PLAIN_DISTILL}}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The teacher trained by 2 processes and by 1, then the distillation runs described in the
    module docstring; their directories, outputs and the server's."""
    from b2kd.pipeline import run_distill, run_evaluate, run_teacher
    from b2kd.provider.serve import ServedTeacher

    root = tmp_path_factory.mktemp("ddp")
    cfg = _teacher_config(root)
    (root / "toy.yaml").write_text(yaml.safe_dump(cfg))
    out: dict = {"root": root, "server_dir": root / "server"}
    out["teacher_two"] = subprocess.run(
        [*LAUNCH, "teacher", "train", "--config", str(root / "toy.yaml"), "--out", str(root / "teacher-two"),
         "teacher.batch_size=16"], env=ENV, check=False, capture_output=True, text=True, timeout=300)
    threads = torch.get_num_threads()
    try:
        run_teacher(Config.model_validate(cfg), root / "teacher-one", log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    teacher = str(root / "teacher-one" / "teacher.pt")

    # 'short' runs out within the third request of 64 (the client pays its last 22, what the 402
    # says is left); 'rest' holds exactly the others
    keys = ("short:150", f"rest:{BUDGET - 150}", f"one:{BUDGET}")
    with ServedTeacher(teacher, out["server_dir"], "soft", api_keys=keys) as server:
        def job(key: str) -> list[str]:
            return [*LAUNCH, "distill", "--config", str(root / "toy.yaml"), "--teacher", teacher,
                    "--teacher-url", server.url, "--api-key", key, "--out", str(root / "two"),
                    "distill.batch_size=16"]

        out["A"] = subprocess.run(job("short"), env=ENV, check=False, capture_output=True, text=True, timeout=300)
        out["A_trained"] = (root / "two" / "checkpoints").exists()

        started = time.monotonic()
        proc = subprocess.Popen(job("rest"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        metrics = root / "two" / "metrics.jsonl"
        try:
            while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() - started < 240, "no epoch finished"
                time.sleep(0.02)
            victim = _rank_pid(proc.pid, 1)
            assert victim is not None, "rank 1 not found"
            os.kill(victim, signal.SIGKILL)
            out["B_epochs_at_kill"] = metrics.read_text().count("\n")
            out["B"] = (proc.wait(timeout=120), proc.stdout.read())
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

        out["C"] = subprocess.run(job("rest"), env=ENV, check=False, capture_output=True, text=True, timeout=300)

        one = Config.model_validate({**cfg, "teacher": {**cfg["teacher"], "checkpoint": teacher,
                                                        "url": server.url, "api_key": "one"}})
        try:
            run_distill(one, root / "one", log=lambda *_: None)
        finally:
            torch.set_num_threads(threads)
        out["one_report"] = run_evaluate(root / "one", one)
    return out


def test_a_failure_on_rank_0_stops_both_ranks_with_a_clear_message(jobs):
    a = jobs["A"]
    assert a.returncode != 0
    text = a.stdout + a.stderr
    assert not re.search(r'File "[^"]*/b2kd/[a-z_/]+\.py"', text), text  # torchrun's traceback only
    assert "error:" in text and "quota" in text  # rank 0's own message
    assert "rank 0 failed while paying for the pool" in text  # rank 1's
    assert not jobs["A_trained"]


def test_kill_9_of_one_rank_mid_training_then_the_same_command_finishes_paying_nothing_twice(jobs):
    code, output = jobs["B"]
    assert code != 0, output  # the job stopped: torchrun ended rank 0 when rank 1 died
    assert jobs["B_epochs_at_kill"] < EPOCHS
    c = jobs["C"]
    assert c.returncode == 0, c.stdout + c.stderr
    assert "resuming distillation at epoch" in c.stdout
    run = jobs["root"] / "two"
    assert [r["epoch"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == \
        list(range(EPOCHS))
    # every image charged exactly once over the three jobs (the quotas left no room for more)
    assert _server_used(jobs["server_dir"], "short") == 150
    assert _server_used(jobs["server_dir"], "rest") == BUDGET - 150
    report = json.loads((run / "report.json").read_text())
    assert report["queries"] == BUDGET


def test_two_ranks_pay_the_same_ledger_and_train_the_same_student_as_one_process(jobs):
    two, one = jobs["root"] / "two", jobs["root"] / "one"
    assert jobs["one_report"]["student_acc"] > 0.3  # the student learnt: accuracies can be compared
    rows_two, rows_one = _ledger(two / "ledger.sqlite"), _ledger(one / "ledger.sqlite")
    assert len(rows_two) == len(rows_one) == BUDGET  # each image once, within the budget
    # same images, same answers; the bytes of a row are its request's share, and the two-rank job's
    # requests were cut differently by the quotas (a last request of 22), so bytes are not compared
    assert [r[:2] + r[4:] for r in rows_two] == [r[:2] + r[4:] for r in rows_one]
    assert _server_used(jobs["server_dir"], "one") == BUDGET
    a, b = read(two / "checkpoints" / "latest.pt"), read(one / "checkpoints" / "latest.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][name], b["state_dict"][name],
                                   atol=WEIGHT_ATOL, rtol=WEIGHT_RTOL, msg=name)
    report_two = json.loads((two / "report.json").read_text())
    assert abs(report_two["student_acc"] - jobs["one_report"]["student_acc"]) < 0.002  # 0.2 points
    assert abs(report_two["latest"]["acc"] - jobs["one_report"]["latest"]["acc"]) < 0.002
    assert report_two["best_epoch"] == jobs["one_report"]["best_epoch"]


def test_two_process_teacher_training_equals_one_process(jobs):
    done, root = jobs["teacher_two"], jobs["root"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("teacher lenet5 test accuracy") == 1  # rank 0 reports, rank 1 is quiet
    two, one = ([json.loads(line) for line in (root / d / "metrics.jsonl").read_text().splitlines()]
                for d in ("teacher-two", "teacher-one"))
    assert [r["epoch"] for r in two] == [0, 1, 2, 3]  # written once, by rank 0
    # the same batches and gradients: the first two epochs' mean losses agree to float precision
    # (channels-last kernels sum a half batch in another order than a whole one: measured 2e-6
    # apart); later the order of float sums is amplified where the loss falls off its plateau
    # (measured: weights apart by up to 0.016 after 100 steps at lr 0.1, the student by 1.5e-7)
    for epoch in (0, 1):
        assert two[epoch]["loss"] == pytest.approx(one[epoch]["loss"], rel=1e-5)
    for epoch in (2, 3):
        assert two[epoch]["loss"] == pytest.approx(one[epoch]["loss"], rel=1e-2)
    a, b = read(root / "teacher-two" / "teacher.pt"), read(root / "teacher-one" / "teacher.pt")
    # after four epochs at lr 0.1 the amplified rounding leaves weights up to 0.065 apart (measured
    # with channels-last kernels), against weights up to 1.7 in size
    for name in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][name], b["state_dict"][name], atol=0.1, rtol=0, msg=name)
    assert b["meta"]["test_acc"] > 0.5  # a teacher worth distilling
    assert abs(a["meta"]["test_acc"] - b["meta"]["test_acc"]) <= 0.01  # 2 of the 200 test images


# --- the sharding arithmetic, with the world size and rank faked (no process group) -------------


@pytest.mark.parametrize("batch", [32, 30, 7, 1])
def test_the_ranks_parts_of_a_batch_cover_it_once_and_weight_to_its_mean_loss(monkeypatch, batch):
    from b2kd.core import distributed

    world = 4
    idx = torch.arange(100, 100 + batch)
    losses = torch.rand(batch, generator=torch.Generator().manual_seed(batch))
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    parts, averaged = [], 0.0
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        mine, images, weight = distributed.my_part(idx, idx.float())
        assert torch.equal(images, mine.float())
        if weight:
            parts.append(mine)
        averaged += weight * float(losses[mine - 100].mean()) / world  # what DDP's average gives
    assert sorted(torch.cat(parts).tolist()) == idx.tolist()  # every image once, across the ranks
    assert averaged == pytest.approx(float(losses.mean()), rel=1e-6)  # the whole batch's mean loss


def test_one_process_is_left_alone_and_the_lr_rules(monkeypatch):
    from b2kd.core import distributed

    idx, images = torch.arange(5), torch.zeros(5, 1, 2, 2)
    assert distributed.my_part(idx, images) == (idx, images, 1.0)
    assert distributed.mean_over_ranks({"loss": 0.5}) == {"loss": 0.5}
    assert distributed.scaled_lr(0.05, "linear") == 0.05
    assert distributed.peer_failure(RuntimeError("Connection closed by peer")) is None  # no job
    assert distributed.peer_failure(distributed.PeerFailed("rank 0 failed")) == "rank 0 failed"
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert distributed.scaled_lr(0.05, "linear") == pytest.approx(0.2)
    assert distributed.scaled_lr(0.05, "sqrt") == pytest.approx(0.1)
    assert distributed.scaled_lr(0.05, "none") == 0.05
    assert "another process of this torchrun job failed" in distributed.peer_failure(
        RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
    assert distributed.peer_failure(RuntimeError("a bug of this rank")) is None
