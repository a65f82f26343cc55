"""The per-class synthetic-vs-real table: values by hand, and in a real run's report."""

import pytest
import torch

from b2kd.evaluate.synthetic_gap import markdown, per_class


def test_per_class_by_hand():
    pred = torch.tensor([0, 0, 1, 2, 2, 1])
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    shares, counts = per_class(pred, labels, 4)
    assert counts == [1, 2, 3, 0]
    assert shares[:3] == pytest.approx([1.0, 0.5, 2 / 3])
    assert shares[3] is None


def test_markdown_lists_every_class():
    table = {"synthetic_agree": [1.0, 0.5], "synthetic_n": [3, 2], "real_acc": [0.5, None], "real_n": [4, 0],
             "gap": [0.5, None], "mean_gap": 0.5, "worst_class": 0}
    text = "\n".join(markdown(table, ["a", "b"]))
    assert "| a | 100.0 (3) | 50.0 (4) | 50.0 |" in text
    assert "| b | 50.0 (2) | - (0) | - |" in text


def test_every_distillation_report_has_the_table(learning_run):
    report = learning_run["report"]
    table = report["synthetic_vs_real"]
    run = learning_run["run"]
    from b2kd.core.checkpoint import read

    held = read(run / "val-slice.pt", "val_slice")
    assert sum(table["synthetic_n"]) == len(held["images"]) == report.get("val_size", len(held["images"]))
    for s, r, g in zip(table["synthetic_agree"], table["real_acc"], table["gap"]):
        if s is not None and r is not None:
            assert g == pytest.approx(s - r)
    assert "Synthetic to real, per class" in (run / "report.md").read_text()
