"""``b2kd predict``: an exported student on PNG files the test writes, as a device would run it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from b2kd.cli import app
from b2kd.data import load_dataset
from b2kd.deploy.export import export_onnx
from b2kd.deploy.predict import ModelError, predict_files
from b2kd.models import load_classifier

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(toy_runs, tmp_path_factory):
    """The toy MEKD student as uint8 and float ONNX models, and 6 test digits written as PNGs."""
    student, _ = load_classifier(toy_runs["mekd"] / "checkpoints" / "best.pt")
    out = tmp_path_factory.mktemp("predict")
    for kind in ("uint8", "float"):
        export_onnx(student, out / f"{kind}.onnx", kind)
    cfg = toy_runs["cfg"].data
    test = load_dataset(cfg.dataset, "test", cfg.root)
    folder = out / "digits"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(test.images[i, 0].numpy()).save(folder / f"digit{i}.png")
    (folder / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    with torch.no_grad():
        expected = torch.softmax(student(test.images[:6]), 1).numpy()
    return out, folder, expected


@pytest.mark.parametrize("kind", ["uint8", "float"])
def test_predict_folder_matches_the_pytorch_student(exported, kind):
    out, folder, expected = exported
    preds = predict_files(out / f"{kind}.onnx", folder)
    assert [p.file.name for p in preds] == [f"digit{i}.png" for i in range(6)]
    for i, p in enumerate(preds):
        assert p.label == int(expected[i].argmax())
        assert p.probability == pytest.approx(float(expected[i].max()), abs=1e-4)


def test_predict_converts_colour_and_size(exported, tmp_path):
    out, folder, expected = exported
    grey = np.asarray(Image.open(folder / "digit0.png"))
    big_rgb = Image.fromarray(np.stack([grey] * 3, -1)).resize((56, 56), Image.Resampling.NEAREST)
    big_rgb.save(tmp_path / "big.png")
    (pred,) = predict_files(out / "uint8.onnx", tmp_path / "big.png")
    assert pred.label == int(expected[0].argmax())


def test_predict_cli_prints_class_and_probability(exported):
    out, folder, expected = exported
    result = runner.invoke(app, ["predict", str(out / "uint8.onnx"), str(folder / "digit3.png")])
    assert result.exit_code == 0, result.output
    assert f"digit3.png: class {int(expected[3].argmax())} (probability" in result.stdout


def test_predict_user_errors_are_one_line(exported, tmp_path):
    out, folder, _ = exported
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.onnx").write_bytes(b"not a model")
    (tmp_path / "fake.png").write_bytes(b"not a png")
    cases = [
        ([tmp_path / "missing.onnx", folder], "model not found"),
        ([tmp_path / "fake.onnx", folder], "cannot load"),
        ([out / "uint8.onnx", tmp_path / "nothing-here"], "no such image file or folder"),
        ([out / "uint8.onnx", tmp_path / "empty"], "no images"),
        ([out / "uint8.onnx", tmp_path / "fake.png"], "cannot read image"),
    ]
    for args, needle in cases:
        with pytest.raises(ModelError, match=needle):
            predict_files(*args)
        result = runner.invoke(app, ["predict", *map(str, args)])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
