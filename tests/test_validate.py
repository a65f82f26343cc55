"""Answer validation, the ledger's refusal of invalid rows and `b2kd ledger clean`, preprocessing."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
import torch
from test_cli import assert_user_error, invoke

from b2kd.blackbox import LocalBackend
from b2kd.blackbox.base import BlackBoxError
from b2kd.blackbox.validate import InvalidAnswer, invalid_rows, problem, softmax_of_logits
from b2kd.edge import BlackBoxTeacher, Ledger, image_hashes
from b2kd.edge.ledger import PoisonedLedger
from b2kd.edge.preprocess import Preprocess

NAN = math.nan


@pytest.mark.parametrize(("kind", "rows", "why"), [
    ("soft", [[0.7, 0.2, 0.1]], None),
    ("soft", [[0.7, 0.2, 0.105]], None),  # sums to 1.005: within the 0.01 tolerance
    ("soft", [[0.7, 0.2, 0.1], [0.7, 0.2, 0.2]], "row 1 is [0.7, 0.2, 0.2]: probabilities sum to 1"),
    ("soft", [[0.5, NAN, 0.5]], "row 0 is [0.5, nan, 0.5]: NaN is not a probability"),
    ("soft", [[math.inf, 0.0, 0.0]], "infinite values"),
    # logits that happen to sum to 1
    ("soft", [[2.3, -1.1, -0.2]], "row 0 is [2.3, -1.1, -0.2]: probabilities lie in [0, 1]"),
    ("rounded:1", [[0.7, 0.2, 0.2]], None),  # 3 values rounded to 0.1 may sum to 1 +- 0.15 (+ 0.01)
    ("rounded:1", [[0.7, 0.2, 0.3]], "sum to 1 (within 0.16), this row to 1.2"),
    ("topk:2", [[0.6, 0.3, NAN]], None),
    ("topk:2", [[0.6, NAN, NAN]], "a top-2 answer holds 2 values"),
    ("topk:2", [[0.8, 0.7, NAN]], "top-k probabilities sum to 1.5 > 1"),
    ("hard", [[0.0, 1.0, 0.0]], None),
    ("hard", [[0.0, 0.5, 0.5]], "a label answer is one-hot"),
    ("hard", [[1.0, 1.0, 0.0]], "a label answer is one-hot"),
])
def test_each_kind_has_a_form_its_answers_must_fit(kind, rows, why):
    found = problem(torch.tensor(rows), kind)
    assert (found is None) if why is None else (why in found), found


def test_invalid_rows_marks_each_bad_row():
    rows = torch.tensor([[0.5, 0.5], [NAN, 1.0], [0.5, 0.5], [1.5, -0.5], [0.2, 0.2]])
    assert invalid_rows(rows, "soft").tolist() == [False, True, False, True, True]


def test_logits_become_probabilities_and_probabilities_are_no_logits():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    expected = [math.exp(2) / (math.exp(2) + 1 + math.exp(-1)), 1 / (math.exp(2) + 1 + math.exp(-1))]
    got = softmax_of_logits(logits, "s")
    assert got[0, :2].tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(InvalidAnswer, match="sent probabilities"):
        softmax_of_logits(torch.tensor([[0.6, 0.4, 0.0]]), "s")
    with pytest.raises(InvalidAnswer, match="invalid logits: row 0"):
        softmax_of_logits(torch.tensor([[1.0, NAN, 0.0]]), "s")


# --- the ledger -----------------------------------------------------------------------------


def _images(n: int, seed: int = 0) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=rng)


def _toy_model() -> torch.nn.Module:
    from b2kd.models import build_model

    torch.manual_seed(0)
    return build_model("lenet5", num_classes=10, in_channels=1, image_size=28).eval()


def test_the_ledger_refuses_to_record_an_invalid_answer(tmp_path):
    x = _images(2)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        with pytest.raises(InvalidAnswer, match="refusing to record invalid 'soft' answers: row 1"):
            ledger.record(image_hashes(x), x, torch.tensor([[1.0] + [0.0] * 9, [NAN] * 10]), "soft",
                          [784, 784], [40, 40], "distill")
        assert ledger.count() == 0


def _poison(path, x: torch.Tensor, row: list[float]) -> None:
    """An invalid answer written as an older b2kd would have: straight into the table."""
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO queries (hash, kind, bytes_sent, bytes_received, response, image, shape,"
                   " stage, created) VALUES (?, 'soft', 784, 40, ?, NULL, '1x28x28', 'distill', 0)",
                   (image_hashes(x)[0], np.array(row, dtype=np.float32).tobytes()))


def test_a_poisoned_ledger_is_refused_and_cleaned_and_then_pays_again(tmp_path):
    model = _toy_model()
    x = _images(6)
    run = tmp_path / "run"
    teacher = BlackBoxTeacher(LocalBackend(model), Ledger(run / "ledger.sqlite"))
    honest = teacher.query(x[:5])
    _poison(run / "ledger.sqlite", x[5:], [NAN] * 10)
    with pytest.raises(PoisonedLedger, match=r"holds invalid 'soft' answers .*b2kd ledger clean"):
        teacher.query(x)
    assert teacher.ledger.invalid_ids() == [6]

    result = invoke("ledger", "clean", run)
    assert result.exit_code == 0, result.output
    assert "removed 1 invalid answers, kept 5" in result.stdout

    again = teacher.query(x)  # the cleaned image is paid for again, the others come from the ledger
    assert torch.equal(again[:5], honest)
    torch.testing.assert_close(again[5:], LocalBackend(model).infer(x[5:]).responses, rtol=0, atol=0)
    assert teacher.ledger.count() == 6 and teacher.ledger.invalid_ids() == []
    teacher.ledger.close()


def test_ledger_clean_of_a_missing_ledger_is_a_clear_error(tmp_path):
    assert_user_error(invoke("ledger", "clean", tmp_path / "nothing"), "no ledger at")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all, not at all" * 10)
    assert_user_error(invoke("ledger", "clean", tmp_path / "junk.sqlite"), "is not a b2kd ledger")


# --- preprocessing --------------------------------------------------------------------------


def test_pixels_become_the_stated_floats():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    sym = Preprocess.build("FP32", 1, "symmetric")
    assert sym(x).dtype == np.float32 and sym(x).ravel().tolist() == pytest.approx([-1.0, -0.6, 1.0])
    mnist = Preprocess.build("FP32", 1, "mnist")
    assert mnist(x).ravel().tolist() == pytest.approx([-0.1307 / 0.3081, (0.2 - 0.1307) / 0.3081,
                                                       (1 - 0.1307) / 0.3081], rel=1e-6)
    own = Preprocess.build("FP16", 1, scale=2.0, mean=[10.0], std=[4.0])  # (p * 2 - 10) / 4
    assert own(x).dtype == np.float16 and own(x).ravel().tolist() == [-2.5, 23.0, 125.0]
    override = Preprocess.build("FP32", 1, "unit", std=[0.5])  # the key beats the preset's value
    assert override(x).ravel().tolist() == pytest.approx([0.0, 0.4, 2.0])
    rgb = Preprocess.build("FP32", 3, "imagenet")
    px = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert rgb(px).ravel().tolist() == pytest.approx([(1 - m) / s for m, s in zip(
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)], rel=1e-6)
    assert Preprocess.build("UINT8", 1)(x).dtype == np.uint8
    assert sym.bytes_per_value == 4 and own.bytes_per_value == 2


@pytest.mark.parametrize(("args", "message"), [
    (("FP32", 1), "its input is FP32: say how pixels become its inputs"),
    (("UINT8", 1, "unit"), "apply only to FP32/FP16 inputs"),
    (("FP32", 1, "nope"), "unknown teacher.input_preset 'nope'"),
    (("FP32", 1, "imagenet"), "teacher.input_mean has 3 values; give 1 or one per channel (1)"),
    (("FP32", 1, None, 0.0), "teacher.input_scale must be a finite number > 0"),
    (("FP32", 1, "unit", None, None, [0.0]), "teacher.input_std must be > 0"),
    (("INT64", 1), "b2kd sends UINT8, FP32 or FP16 images"),
])
def test_preprocessing_that_cannot_fit_is_refused(args, message):
    with pytest.raises(BlackBoxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Preprocess.build(*args)
