"""The report of how the teacher labelled the paid pool: counts, shares, thin classes, report.md."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from b2kd.edge import Ledger, image_hashes
from b2kd.pool.labels import (
    NOT_TEST_ACCURACY,
    markdown,
    paid_answers,
    run_summary,
    summarise,
    thin_warning,
)


def one_hot_rows(counts: list[int]) -> torch.Tensor:
    """Hard answers: counts[k] one-hot rows of class k, interleaved."""
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    return torch.nn.functional.one_hot(labels[torch.randperm(len(labels))], len(counts)).float()


def test_counts_and_shares_of_soft_and_top_k_answers():
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    s = summarise(soft)
    assert s["answers"] == 4 and s["num_classes"] == 3
    assert s["counts"] == [1, 2, 1]
    assert s["shares"] == [0.25, 0.5, 0.25]
    nan = float("nan")  # top-1 answers: the class the API named, NaN elsewhere
    topk = torch.tensor([[nan, 0.9, nan], [0.6, nan, nan], [nan, 0.5, nan]])
    assert summarise(topk)["counts"] == [1, 2, 0]


def test_the_issue_case_warns_and_a_balanced_pool_does_not():
    # 20,000 paid images over 10 classes: thin below 0.25 * 20000 / 10 = 500
    counts = [2000, 2000, 2000, 188, 4992 - 1180, 2000, 2000, 2000, 2000, 2000]
    counts[0] += 20000 - sum(counts)
    s = summarise(one_hot_rows(counts), thin_factor=0.25)
    assert s["answers"] == 20000 and s["counts"] == counts
    assert s["thin_below"] == 500.0
    assert s["thin_classes"] == [3]
    assert s["shares"][3] == pytest.approx(188 / 20000)
    warning = thin_warning(s)
    assert warning is not None and "3 (188)" in warning and "500" in warning

    balanced = summarise(one_hot_rows([2000] * 10))
    assert balanced["thin_classes"] == [] and thin_warning(balanced) is None
    # at the threshold a class is not thin (strictly fewer than factor * N / K is)
    edge = summarise(one_hot_rows([500] + [2000] * 9 + [1500]), thin_factor=0.25)
    assert edge["thin_below"] == pytest.approx(0.25 * 20000 / 11) and edge["thin_classes"] == []


def test_one_dominant_label_makes_the_others_thin():
    # the issue's other case: 16,063 of 20,000 answers one class
    counts = [16063] + [437] * 8 + [20000 - 16063 - 8 * 437]
    s = summarise(one_hot_rows(counts))
    assert s["thin_classes"] == list(range(1, 10))
    assert "classes" in thin_warning(s)
    # class 9 holds 441: thin below 0.25 * 2000 = 500, not below 0.22 * 2000 = 440
    assert summarise(one_hot_rows(counts), thin_factor=0.22)["thin_classes"] == list(range(1, 9))
    assert summarise(one_hot_rows(counts), thin_factor=0.0)["thin_classes"] == []


def test_a_class_never_answered_is_thin():
    s = summarise(one_hot_rows([5, 5, 0]))
    assert s["counts"] == [5, 5, 0] and s["thin_classes"] == [2]


def test_markdown_table_warning_and_the_val_agree_sentence():
    s = summarise(one_hot_rows([30, 10, 1]))  # thin below 0.25 * 41 / 3 = 3.42
    text = "\n".join(markdown(s))
    assert "| 0 | 30 | 73.17% |  |" in text
    assert "| 2 | 1 | 2.44% | thin |" in text
    assert "**Warning:** thin class in the paid pool: 2 (1)" in text
    assert "matplotlib is not installed" in text
    assert NOT_TEST_ACCURACY in text and "not test accuracy" in NOT_TEST_ACCURACY
    s["plot"] = "pool-labels.png"
    assert "![teacher's top-1 over the paid pool](pool-labels.png)" in "\n".join(markdown(s))
    assert NOT_TEST_ACCURACY in "\n".join(markdown(None))


def test_paid_answers_reads_only_the_stage_and_kind_asked_for(tmp_path):
    images = torch.arange(6, dtype=torch.uint8).reshape(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    soft = torch.softmax(torch.randn(6, 4), 1)
    hard = torch.nn.functional.one_hot(soft[:3].argmax(1), 4).float()
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as ledger:
        for rows, answers, kind, stage in ((slice(0, 4), soft[:4], "soft", "distill"),
                                           (slice(4, 6), soft[4:], "soft", "fidelity"),
                                           (slice(0, 3), hard, "hard", "distill")):
            n = len(answers)
            ledger.record(image_hashes(images[rows]), images[rows], answers, kind, [4] * n,
                          [16] * n, stage)
    got = paid_answers(path, "soft")
    assert got.shape == (4, 4)
    assert torch.equal(got.sort(0).values, soft[:4].sort(0).values)
    assert paid_answers(path, "hard").shape == (3, 4)
    assert paid_answers(path, "topk:2") is None
    assert paid_answers(tmp_path / "missing.sqlite", "soft") is None


def test_report_of_a_tiny_run_holds_the_table(toy_runs, tmp_path):
    from b2kd.pipeline import run_evaluate

    run = tmp_path / "mekd"
    shutil.copytree(toy_runs["mekd"], run)
    result = run_evaluate(run)
    labels = result["pool_labels"]
    budget = toy_runs["cfg"].distill.budget
    assert labels["answers"] == budget and sum(labels["counts"]) == budget
    assert labels == json.loads((run / "report.json").read_text())["pool_labels"]
    md = (run / "report.md").read_text()
    assert "## How the teacher labelled the paid pool" in md
    assert "| class | answers | share | |" in md
    for k, count in enumerate(labels["counts"]):
        assert f"| {k} | {count} | {100 * count / budget:.2f}% |" in md
    assert NOT_TEST_ACCURACY in md
    assert ("**Warning:**" in md) == bool(labels["thin_classes"])
    pytest.importorskip("matplotlib")
    assert labels["plot"] == "pool-labels.png" and (run / "pool-labels.png").stat().st_size > 1000
    assert run_summary(tmp_path, "soft", 0.25) is None  # no ledger: no section, no failure


def test_without_matplotlib_the_report_says_so_and_nothing_fails(tmp_path, monkeypatch):
    import sys

    from b2kd.evaluate.report import write_report

    images = torch.arange(4, dtype=torch.uint8).reshape(4, 1, 1, 1)
    hard = one_hot_rows([3, 1])
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.record(image_hashes(images), images, hard, "hard", [1] * 4, [4] * 4, "distill")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    summary = run_summary(tmp_path, "hard", 0.25)
    assert summary["counts"] == [3, 1] and summary["plot"] is None
    assert not (tmp_path / "pool-labels.png").exists()
    write_report(tmp_path, {"method": "mekd", "response": "hard", "pool_labels": summary})
    text = (tmp_path / "report.md").read_text()
    assert "| 1 | 1 | 25.00% |  |" in text and "matplotlib is not installed" in text
    assert json.loads((tmp_path / "report.json").read_text())["pool_labels"] == summary


def test_answers_reused_from_deprivatization_are_counted_and_named(tmp_path):
    images = torch.arange(4, dtype=torch.uint8).reshape(4, 1, 1, 1)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        ledger.record(image_hashes(images), images, one_hot_rows([4, 0]), "hard", [1] * 4, [4] * 4,
                      "distill")
    summary = run_summary(tmp_path, "hard", 0.25, extra=one_hot_rows([0, 2]))
    assert summary["counts"] == [4, 2] and summary["answers"] == 6 and summary["extra_answers"] == 2
    assert "(4 paid for by this run, `ledger.sqlite`; 2 reused from deprivatization)" in "\n".join(
        markdown(summary))
    (tmp_path / "no-ledger").mkdir()
    only_reused = run_summary(tmp_path / "no-ledger", "hard", 0.25, extra=one_hot_rows([1, 1]))
    assert only_reused["counts"] == [1, 1]
