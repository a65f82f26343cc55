"""``b2kd adapt``: a new task learnt on the device from a distilled run, with no query sent.

A toy ``b2kd distill`` run (tests/toy.py: random images, an untrained teacher, 200 paid
queries) is built once for the module. The new task is easy on purpose, so that the head
and the fine-tuning must beat chance by far: which of three horizontal bands of a noisy
image holds a bright bar. The labelled set is a folder of PNGs (classes sorted by folder
name: bottom, middle, top); the test set an .npz naming its classes in another order, so a
mix-up of label indices would show as chance accuracy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import assert_ok, assert_user_error, invoke, ledger_rows
from toy import make_toy, toy_model

from b2kd.core.checkpoint import read
from b2kd.core.metrics import predict
from b2kd.data.labelled import LabelledSet, choose_shots
from b2kd.models import load_classifier

BANDS = ("top", "middle", "bottom")
PER_CLASS = 8  # labelled images per class in the folder
SHOTS = 5


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """In-process runs set torch's thread count from the config; give the next module its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def bars(n: int, seed: int, channels: int = 1, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Noise 0..59 with a bright bar in band ``label`` (0 top, 1 middle, 2 bottom); uint8 (N, C, H, W)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, channels, size, size), dtype=np.uint8)
    y = np.arange(n) % 3
    band = size // 3
    for i, label in enumerate(y):
        x[i, :, label * band + 2 : label * band + band - 2, 4 : size - 4] = 250
    return x, y


def write_folder(root, images: np.ndarray, labels: np.ndarray, names=BANDS):
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        mode = "L" if img.shape[0] == 1 else "RGB"
        Image.fromarray(img[0] if mode == "L" else img.transpose(1, 2, 0), mode).save(
            root / names[label] / f"{i:03d}.png")
    return root


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A toy `b2kd distill` run (MEKD, soft, 200 queries): its directory."""
    toy = make_toy(tmp_path_factory.mktemp("adapt-toy"), toy_model())
    out = toy / "run"
    assert_ok(invoke("distill", "--config", toy / "toy.yaml", "--teacher", toy / "teacher.pt",
                     "--generator", toy / "generator.pt", "--out", out))
    return out


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """{"folder": labelled PNG folder (8 per class), "test": .npz of 90 test images}."""
    root = tmp_path_factory.mktemp("adapt-task")
    x, y = bars(3 * PER_CLASS, seed=1)
    folder = write_folder(root / "labelled", x, y)
    tx, ty = bars(90, seed=2)
    order = ["middle", "bottom", "top"]  # another order than the folder's sorted one
    np.savez(root / "test.npz", images=tx[:, 0], labels=np.array([order.index(BANDS[k]) for k in ty]),
             classes=np.array(order))
    return {"root": root, "folder": folder, "test": root / "test.npz"}


@pytest.fixture(scope="module")
def adapted(run, task, tmp_path_factory):
    """`b2kd adapt` on the toy run, with every way of opening a teacher made to fail."""
    from b2kd.blackbox import LocalBackend
    from b2kd.edge import BlackBoxTeacher
    from b2kd.edge.client import HTTPTeacher

    def no_teacher(*args, **kwargs):
        raise AssertionError("adapt opened a teacher")

    ledger = run / "ledger.sqlite"
    before = {"rows": len(ledger_rows(ledger)), "sha": sha(ledger), "mtime": ledger.stat().st_mtime_ns}
    out = tmp_path_factory.mktemp("adapt-out") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BlackBoxTeacher, "__init__", no_teacher)
        mp.setattr(LocalBackend, "from_checkpoint", no_teacher)
        mp.setattr(HTTPTeacher, "__init__", no_teacher)
        result = invoke("adapt", run, "--labelled", task["folder"], "--shots", SHOTS, "--test", task["test"],
                        "--out", out, "adapt.finetune_epochs=20", "adapt.seed=3")
    assert_ok(result)
    return {"out": out, "result": result, "ledger": ledger, "before": before}


def test_adapt_learns_the_new_task_far_above_chance_and_reports_what_its_checkpoints_do(adapted, task):
    out = adapted["out"]
    report = json.loads((out / "report.json").read_text())
    new = report["new_task"]
    assert report["classes"] == ["bottom", "middle", "top"] and report["train_images"] == 3 * SHOTS
    assert new["chance"] == pytest.approx(1 / 3) and new["test_images"] == 90
    # measured 100% and 100%: an untrained head averages chance, a label mix-up gives about 1/3
    assert new["head_acc"] >= 0.8
    assert new["finetuned_acc"] >= 0.8
    assert report["finetune"]["steps"] == 20  # 25 private images: one step per epoch

    # the report's figures, recomputed from the files: the new-task model on the test set ...
    model, meta = load_classifier(out / "checkpoints" / "best.pt")
    assert meta["role"] == "adapted" and meta["task"] == "new" and model.num_classes == 3
    test = np.load(task["test"])
    names = [str(c) for c in test["classes"]]
    truth = torch.tensor([report["classes"].index(names[k]) for k in test["labels"]])
    pred = predict(model, torch.from_numpy(test["images"][:, None]))
    assert float((pred == truth).float().mean()) == pytest.approx(new["acc"])
    # ... and the old head on the same body; fine-tuning moved that body away from the student's
    old, _ = load_classifier(out / "checkpoints" / "old.pt")
    student, _ = load_classifier(Path(report["run"]) / "checkpoints" / "best.pt")
    assert old.num_classes == student.num_classes == 10
    new_state, old_state, student_state = model.state_dict(), old.state_dict(), student.state_dict()
    body = [k for k in new_state if not k.startswith("classifier.4.")]
    assert all(torch.equal(new_state[k], old_state[k]) for k in body)
    assert not all(torch.equal(old_state[k], student_state[k]) for k in body)
    md = (out / "report.md").read_text()
    assert "queries: 0" in md and "forgetting" in md and "+ fine-tuning" in md


def test_adapt_sends_nothing_and_leaves_the_runs_ledger_untouched(adapted):
    report = json.loads((adapted["out"] / "report.json").read_text())
    assert report["queries"] == 0 and report["bytes_sent"] == 0 and report["private_images_sent"] == 0
    ledger, before = adapted["ledger"], adapted["before"]
    assert before["rows"] == 200
    assert len(ledger_rows(ledger)) == before["rows"]
    assert sha(ledger) == before["sha"] and ledger.stat().st_mtime_ns == before["mtime"]
    assert not (adapted["out"] / "ledger.sqlite").exists()
    assert "queries 0" in adapted["result"].stdout


def test_b2kd_export_turns_the_adapted_model_into_onnx_and_int8(adapted):
    out = adapted["out"]
    result = invoke("export", out)
    assert_ok(result)
    exported = json.loads((out / "export.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert exported["torch"]["acc"] == pytest.approx(report["new_task"]["acc"])  # on the 90 test images
    assert exported["parity"]["images"] == 90 and exported["parity"]["top1_agreement"] == 1.0
    assert exported["torch"]["fidelity"] is None  # the teacher knows no new class
    assert "paid pool" in exported["calibration"]  # generator images of the run, never private ones
    assert read(out / "pool.pt", "pool")["source"] == "generator"
    from b2kd.deploy.predict import OnnxModel

    for name in ("student.onnx", "student.int8.onnx"):
        logits = OnnxModel(out / name).logits(bars(6, seed=4)[0])
        assert logits.shape == (6, 3)  # the new task's head


def test_without_fine_tuning_or_a_test_set_the_old_task_is_the_students_own(run, task, tmp_path):
    out = tmp_path / "out"
    assert_ok(invoke("adapt", run, "--labelled", task["folder"], "--shots", 2, "--out", out,
                     "adapt.finetune_epochs=0"))
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"] is None and report["new_task"]["acc"] is None  # nothing to test on
    assert report["old_task"]["agreement"] == 1.0 and report["old_task"]["forgetting"] == 0.0
    old, _ = load_classifier(out / "checkpoints" / "old.pt")
    student, _ = load_classifier(run / "checkpoints" / "best.pt")
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in old.state_dict().items())
    saved = np.load(out / "task.npz")  # what `b2kd export` evaluates on: the 6 shots, as stated
    assert saved["x_test"].shape == (6, 1, 28, 28) and (saved["x_test"] == saved["x_train"]).all()
    assert "no test set was given" in (out / "report.md").read_text()


def test_shots_are_a_seeded_choice_and_a_smaller_k_is_part_of_a_larger_one():
    labels = torch.arange(60) % 3
    data = LabelledSet(torch.arange(60, dtype=torch.uint8).view(60, 1, 1, 1), labels, list(BANDS), "x")

    def chosen(k, seed):
        return choose_shots(data, k, seed).images.flatten().tolist()

    assert chosen(5, 0) == chosen(5, 0) and chosen(5, 0) != chosen(5, 1)
    assert sorted(choose_shots(data, 5, 0).labels.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    assert set(chosen(1, 0)) <= set(chosen(5, 0))


# --- bad input: one error line, exit 2, nothing written ----------------------------------------


def _empty_class(root):
    folder = write_folder(root / "l", *bars(6, 0))
    (folder / "empty").mkdir()
    return ["--labelled", folder]


def _wrong_size(root):
    x, y = bars(9, 0, size=32)
    np.savez(root / "l.npz", images=x, labels=y)
    return ["--labelled", root / "l.npz"]


def _wrong_channels(root):
    return ["--labelled", write_folder(root / "l", *bars(9, 0, channels=3))]


@pytest.mark.parametrize(("make", "extra", "needles"), [
    (_empty_class, [], ["class folder", "empty holds no images"]),
    (lambda root: ["--labelled", write_folder(root / "l", *bars(9, 0))], ["--classes", "top,middle"],
     ["class 'bottom' is not one of the classes given (top, middle)"]),
    (lambda root: ["--labelled", write_folder(root / "l", *bars(9, 0))], [],
     ["class 'bottom' has 3 image(s)", "fewer than the 5 shots asked for"]),
    (_wrong_size, [], ["are 1x32x32 (channels x height x width) but the lenet5 student takes 1x28x28"]),
    (_wrong_channels, [], ["are 3x28x28", "the lenet5 student takes 1x28x28"]),
    (lambda root: ["--labelled", root / "missing"], [], ["is neither a folder of class folders nor an .npz"]),
    (lambda root: [], [], ["adapt needs --labelled PATH"]),
], ids=["empty-class-folder", "class-not-in-classes", "k-above-a-class", "wrong-size", "wrong-channels",
        "no-such-labelled", "no-labelled"])
def test_bad_labelled_sets_are_one_clear_error(run, tmp_path, make, extra, needles):
    args = make(tmp_path)
    result = invoke("adapt", run, *args, "--shots", SHOTS, *extra, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert_user_error(result, *needles)
    assert not (tmp_path / "out").exists()


def test_a_run_that_is_not_a_distill_run_is_refused(run, adapted, tmp_path):
    folder = write_folder(tmp_path / "l", *bars(15, 0))
    (tmp_path / "nothing").mkdir()
    for not_a_run, needle in [(tmp_path / "nothing", "is not a `b2kd distill` run directory"),
                              (adapted["out"], "checkpoints/best.pt is not a distilled student (role: adapted)")]:
        result = invoke("adapt", not_a_run, "--labelled", folder, "--shots", SHOTS, "--out", tmp_path / "o")
        assert result.exit_code == 2
        assert_user_error(result, needle)
    for args, needle in [(["--out", run], "is the run directory itself"),
                         ([], "adapt needs --shots K")]:
        shots = [] if not args else ["--shots", SHOTS]
        result = invoke("adapt", run, "--labelled", folder, *shots, *args)
        assert result.exit_code == 2
        assert_user_error(result, needle)
    assert not (tmp_path / "o").exists() and not (run / "adapt").exists()


def test_a_malformed_config_yaml_is_one_line_and_no_traceback(run, tmp_path):
    """Before: PyYAML's own 5-8 line message (a copy of the line and a caret) under 'error:'."""
    import shutil

    broken = tmp_path / "broken-run"
    shutil.copytree(run / "checkpoints", broken / "checkpoints")
    (broken / "config.yaml").write_text("seed: 0\ndistill:\n  budget: [1, 2\n  epochs: 3\n")
    folder = write_folder(tmp_path / "l", *bars(15, 0))
    result = invoke("adapt", broken, "--labelled", folder, "--shots", SHOTS, "--out", tmp_path / "o")
    assert result.exit_code == 2
    assert_user_error(result, f"{broken / 'config.yaml'}:", "not valid YAML")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    assert not (tmp_path / "o").exists()
