"""CLI edge cases refused before anything is paid, and the demo naming the dataset it runs on."""

from __future__ import annotations

import pytest
from hostile import Hostile, answer, request_of, uniform
from test_cli import assert_user_error, invoke, ledger_rows
from toy import make_toy, toy_model


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("edges-toy"), toy_model())


def honest(body, headers):
    request_id, x = request_of(body, headers)
    return answer(request_id, uniform(len(x)))


# the toy config trains in batches of 32 with a 5% validation slice: at least 34 queries
@pytest.mark.parametrize(("args", "needle"), [
    (["--budget", "0"], "distill.budget: Input should be greater than or equal to 1"),
    (["--budget", "-5"], "distill.budget: Input should be greater than or equal to 1"),
    (["distill.epochs=-1"], "distill.epochs: Input should be greater than or equal to 1"),
    (["--budget", "50", "distill.batch_size=128"],
     "budget 50 is too small: the paid pool must hold at least one full training batch"
     " (distill.batch_size 128) plus its validation slice (distill.val_fraction 0.05), so at least 135"),
    (["--budget", "1"], "budget 1 is too small"),
    (["--budget", "33"], "so at least 34 queries"),
], ids=["budget-0", "budget-minus-5", "epochs-minus-1", "budget-50-below-one-batch", "budget-1", "budget-33"])
def test_budgets_and_epochs_that_cannot_train_are_refused_before_anything_is_paid(toy, tmp_path, args,
                                                                                  needle):
    with Hostile(honest) as server:
        result = invoke("distill", "--config", toy / "toy.yaml", "--teacher-url", server.url,
                        "--generator", toy / "generator.pt", "--out", tmp_path / "run", *args)
    assert_user_error(result, needle)
    assert sum(server.requests.values()) == 0  # not even the metadata was asked for
    assert ledger_rows(tmp_path / "run" / "ledger.sqlite") == []


def test_the_smallest_budget_allowed_trains(toy, tmp_path):
    result = invoke("distill", "--config", toy / "toy.yaml", "--teacher", toy / "teacher.pt",
                    "--generator", toy / "generator.pt", "--out", tmp_path / "run", "--budget", "34")
    assert result.exit_code == 0, result.output
    assert len(ledger_rows(tmp_path / "run" / "ledger.sqlite")) == 34


def test_the_demo_names_the_dataset_it_runs_on():
    from b2kd.demo import summary_table

    assert "MNIST" not in invoke("demo", "--help").stdout
    report = {"dataset": "fashion_mnist", "teacher_arch": "cnn_small", "student_arch": "lenet5",
              "teacher_acc": 0.9, "deprivatize_queries": 10, "deprivatize_bytes_sent": 7840,
              "deprivatize_bytes_received": 400, "deprivatize_private_images_sent": 0, "responses": [],
              "seconds": {"teacher": 1.0, "deprivatize": 1.0}}
    assert summary_table(report).title == "b2kd demo: Fashion-MNIST, teacher cnn_small -> student lenet5"
    assert summary_table({**report, "dataset": "npz"}).title.startswith("b2kd demo: npz, teacher")


# --- one form for every error -------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["deprivatize", "--epochs", "x"], "Invalid value for '--epochs'"),
    (["distill", "--budget", "x"], "Invalid value for '--budget'"),
    (["distill", "--no-such-option"], "No such option: --no-such-option"),
], ids=["deprivatize-bad-int", "distill-bad-int", "unknown-option"])
def test_usage_errors_are_one_error_line_like_every_other(args, needle):
    result = invoke(*args)
    assert_user_error(result, needle, f" {args[0]} --help')")  # CliRunner calls the program 'root'
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert "Error:" not in result.output and "Usage:" not in result.output


@pytest.mark.parametrize(("text", "where", "problem"), [
    ("distill:\n  budget: [1\n  lr: 3\n", ":3:5:", "expected ',' or ']'"),
    ("distill:\n\tbudget: 1\n", ":2:1:", "found character '\\t' that cannot start any token"),
], ids=["unclosed-list", "tab"])
def test_a_malformed_yaml_config_is_one_line_with_file_line_and_column(tmp_path, text, where, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for command in ("deprivatize", "distill", "serve"):
        result = invoke(command, "--config", path, "--out", tmp_path / "run")
        assert_user_error(result, f"{path}{where} not valid YAML: {problem}")
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()  # a run directory's config and a bench file are read the same way
    (tmp_path / "run" / "config.yaml").write_text(text)
    for args, shown in ((["evaluate", tmp_path / "run"], tmp_path / "run" / "config.yaml"), (["bench", path], path)):
        result = invoke(*args)
        assert_user_error(result, f"{shown}{where} not valid YAML")
        assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


# --- warm-up and short runs -----------------------------------------------------------------------


def test_the_warm_up_takes_at_most_a_tenth_of_the_run():
    """Budget 2,000 for one epoch is about 48 steps: a 50-step warm-up was the whole run."""
    import torch

    from b2kd.core.engine import clipped_warmup, make_step_scheduler

    assert clipped_warmup(50, 48) == 4 and clipped_warmup(50, 1000) == 50 and clipped_warmup(50, 5) == 0

    def lrs(total: int, warmup: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_step_scheduler(opt, "cosine", total, warmup)
        seen = []
        for _ in range(total):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return seen

    short = lrs(48, 50)
    assert short[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and max(short) == pytest.approx(1.0)
    assert sum(short) / len(short) > 0.5  # before: 0.5 at most, every step inside the warm-up
    assert lrs(1000, 50)[49] == pytest.approx(1.0) and lrs(1000, 50)[24] == pytest.approx(0.5)


def test_a_distillation_too_short_to_learn_is_warned_of_before_it_pays(toy, tmp_path):
    from b2kd.core.config import Config
    from b2kd.pipeline import short_distillation

    result = invoke("distill", "--config", toy / "toy.yaml", "--teacher", toy / "teacher.pt",
                    "--generator", toy / "generator.pt", "--out", tmp_path / "run", "distill.warmup_steps=50")
    assert result.exit_code == 0, result.output
    # 200 queries, 190 to train on in batches of 32, one epoch: 6 steps
    assert "warning: the student trains for about 6 steps, fewer than 200; its 50-step warm-up is cut to 0" \
        in result.stdout
    long_run = Config.model_validate({"distill": {"budget": 2000, "steps": 400, "batch_size": 32}})
    assert short_distillation(long_run) is None
    one_epoch = Config.model_validate({"distill": {"budget": 2000, "epochs": 1, "batch_size": 40,
                                                   "warmup_steps": 50}})
    assert "about 48 steps" in short_distillation(one_epoch) and "cut to 4" in short_distillation(one_epoch)


# --- the paid-fidelity line, the demo's key -------------------------------------------------------


def test_the_pay_fidelity_line_says_its_teacher_accuracy_is_a_paid_sample(capsys):
    from b2kd.cli import _print_result

    result = {"teacher_acc": 0.9, "student_acc": 0.8, "latest": {"acc": 0.7}, "fidelity": 0.85,
              "queries": 200, "private_images_sent": 0, "fidelity_images": 30}
    _print_result(result)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("teacher 90.00% (on a paid sample of 30 test images) | student (best) 80.00%")
    assert "fidelity 85.00% (same sample)" in line
    _print_result({**result, "fidelity_images": None})
    assert "paid sample" not in capsys.readouterr().out


def test_the_demo_gives_its_servers_their_key_outside_the_command_line(toy, tmp_path, monkeypatch):
    """The command line of every process is readable by every user (ps, /proc/PID/cmdline)."""
    import contextlib
    from pathlib import Path

    from b2kd import demo
    from b2kd.core.config import Config

    started = []

    class Recorded(demo.ServedTeacher):
        def start(self):
            started.append(super().start())
            return started[-1]

    monkeypatch.setattr(demo, "ServedTeacher", Recorded)
    cfg = Config.model_validate({"threads": 1, "teacher": {"checkpoint": str(toy / "teacher.pt")}})
    with contextlib.ExitStack() as servers:
        urls = demo._serve_locally(cfg, tmp_path / "demo", servers, log=lambda *a, **k: None)
        assert set(urls) == {"soft", "hard"} and len(started) == 2
        key = cfg.teacher.api_key
        for server in started:
            cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
            assert b"serve" in cmdline and key.encode() not in cmdline
            assert "--api-key" not in cmdline.decode()
            environ = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
            assert f"B2KD_SERVE_KEYS={key}".encode() in environ
        import torch

        from b2kd.edge.client import HTTPTeacher

        with HTTPTeacher(urls["soft"], api_key=key, retries=0) as api:  # the key opens the server
            assert api.infer(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).responses.shape == (2, 10)
