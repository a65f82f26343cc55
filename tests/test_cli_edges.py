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
