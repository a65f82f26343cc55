"""b2kd's client against a server b2kd did not write: the ``kserve`` SDK's ModelServer (v2 REST).

tests/kserve_teacher.py serves the toy teacher as a provider would: FP32 (and
FP16) inputs already normalised, a fixed batch dimension, and a model that
answers logits. Distillation through ``--teacher-url`` pays answers equal to
the in-process model's. kserve is a test extra (``pip install -e .[test]``);
without it these tests are skipped.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from test_cli import assert_ok, assert_user_error, invoke, ledger_rows
from toy import make_toy, toy_model

from b2kd.blackbox import BlackBoxError, LocalBackend, TeacherRefused
from b2kd.blackbox.validate import InvalidAnswer
from b2kd.edge import Ledger
from b2kd.edge.client import HTTPTeacher

pytest.importorskip("kserve")
PIXELS = 28 * 28


def images(n: int, seed: int = 0) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=rng)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model():
    return toy_model()


@pytest.fixture(scope="module")
def toy(model, tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("kserve-toy"), model)


@pytest.fixture(scope="module")
def kserve(toy, tmp_path_factory):
    """The root URL of a kserve ModelServer process serving the toy teacher four ways."""
    port = free_port()
    log = (tmp_path_factory.mktemp("kserve") / "server.log").open("w")
    script = Path(__file__).with_name("kserve_teacher.py")
    process = subprocess.Popen([sys.executable, str(script), str(toy / "teacher.pt"), str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"kserve exited; see {log.name}"
            assert time.monotonic() < deadline, f"kserve did not start; see {log.name}"
            try:
                if httpx.get(root + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield root
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_an_fp32_normalised_model_answers_as_the_in_process_one(kserve, model, binary):
    x = images(300, seed=1)  # two requests: 256 + 44
    with HTTPTeacher(kserve + "/v2/models/fp32", binary=binary, input_preset="symmetric") as backend:
        assert str(backend.kind) == "soft" and backend.image_shape == (1, 28, 28)
        assert backend.preprocess.datatype == "FP32" and backend.batch_size == 256  # /config: 404
        answer = backend.infer(x)
    # the same batches through the same network on both sides: equal to the bit
    torch.testing.assert_close(answer.responses, LocalBackend(model).infer(x).responses, rtol=0, atol=0)
    per_image = sum(answer.bytes_sent) / len(x)
    if binary:  # 4 bytes per pixel, plus each request's JSON header spread over its images
        assert 4 * PIXELS < per_image <= 4 * PIXELS * 1.01
    else:
        assert per_image > 8 * PIXELS  # JSON floats take far more


def test_fp16_inputs_travel_at_2_bytes_a_pixel(kserve, model):
    x = images(64, seed=2)
    with HTTPTeacher(kserve + "/v2/models/fp16", input_preset="symmetric") as backend:
        answer = backend.infer(x)
    torch.testing.assert_close(answer.responses, LocalBackend(model).infer(x).responses, rtol=0, atol=1e-3)
    assert 2 * PIXELS < sum(answer.bytes_sent) / len(x) <= 2 * PIXELS * 1.02


def test_a_fixed_batch_dimension_is_filled(kserve, model):
    x = images(10, seed=3)  # 4 + 4 + 2 (padded to 4); atol: batches of 4 here, of 10 in-process
    with HTTPTeacher(kserve + "/v2/models/fixed4", input_preset="symmetric") as backend:
        assert backend.batch_size == 4
        answer = backend.infer(x)
    torch.testing.assert_close(answer.responses, LocalBackend(model).infer(x).responses, rtol=0, atol=1e-6)
    assert sum(answer.bytes_sent) > 12 * 4 * PIXELS  # the two padding images travelled too


def test_a_logits_model_answers_probabilities_once_stated(kserve, model):
    x = images(100, seed=4)
    with HTTPTeacher(kserve + "/v2/models/logits", output="logits") as backend:
        answer = backend.infer(x)
    torch.testing.assert_close(answer.responses, LocalBackend(model).infer(x).responses, rtol=0, atol=0)
    with HTTPTeacher(kserve + "/v2/models/logits") as backend:  # logits taken for probabilities
        with pytest.raises(InvalidAnswer, match="probabilities lie in .* teacher.output=logits"):
            backend.infer(x)


def test_clear_errors_for_an_unstated_preprocessing_and_a_versioned_url(kserve):
    with pytest.raises(BlackBoxError, match="its input is FP32: say how pixels become its inputs"):
        HTTPTeacher(kserve + "/v2/models/fp32")
    with pytest.raises(TeacherRefused, match="HTTP 501.*Model versioning not supported yet"):
        HTTPTeacher(kserve + "/v2/models/fp32/versions/1", retries=50)


def test_a_model_whose_metadata_lists_no_input_is_named_on_the_edge(kserve, model, toy, tmp_path):
    url = kserve + "/v2/models/untyped"
    assert httpx.get(url).json()["inputs"] == []  # kserve's default for a model that states none
    with pytest.raises(BlackBoxError, match="lists 0 inputs; name it with teacher.input_name"):
        HTTPTeacher(url, input_preset="symmetric")
    x = images(40, seed=5)
    with HTTPTeacher(url, input_preset="symmetric", input_name="pixels", input_datatype="FP32",
                     input_shape=[1, 28, 28]) as backend:
        assert backend.input_name == "pixels" and backend.fixed_batch is None
        answer = backend.infer(x)
    torch.testing.assert_close(answer.responses, LocalBackend(model).infer(x).responses, rtol=0, atol=1e-6)
    out = tmp_path / "run"
    result = invoke("distill", "--config", toy / "toy.yaml", "--teacher-url", url, "--generator",
                    toy / "generator.pt", "--out", out, "teacher.input_preset=symmetric",
                    "teacher.input_name=pixels", "teacher.input_datatype=FP32", "teacher.input_shape=[1,28,28]")
    assert_ok(result)
    assert ledger_rows(out / "ledger.sqlite") == [("soft", "distill")] * 200


@pytest.mark.parametrize(("name", "settings"), [("fp32", "teacher.input_preset=symmetric"),
                                                ("logits", "teacher.output=logits")])
def test_distill_through_a_kserve_teacher_pays_the_in_process_answers(kserve, toy, model, tmp_path, name,
                                                                      settings):
    out = tmp_path / "run"
    result = invoke("distill", "--config", toy / "toy.yaml", "--teacher-url", f"{kserve}/v2/models/{name}",
                    "--generator", toy / "generator.pt", "--out", out, settings)
    assert_ok(result)
    assert ledger_rows(out / "ledger.sqlite") == [("soft", "distill")] * 200
    with Ledger(out / "ledger.sqlite") as ledger:
        hashes, sent = ledger.images()
        paid = torch.stack([ledger.lookup(hashes, "soft")[h] for h in hashes])
        totals = ledger.totals()
    # atol: the pool was paid in batches of 64, the reference runs 200 at once
    torch.testing.assert_close(paid, LocalBackend(model).infer(sent).responses, rtol=0, atol=1e-6)
    bytes_per_pixel = 4 if name == "fp32" else 1
    assert bytes_per_pixel * PIXELS * 200 < totals["bytes_sent"] <= bytes_per_pixel * PIXELS * 200 * 1.05
    assert "fidelity -" in result.stdout  # no local teacher: b2kd evaluate --pay-fidelity can pay for it


def test_distill_refuses_an_fp32_teacher_without_a_stated_preprocessing(kserve, toy, tmp_path):
    result = invoke("distill", "--config", toy / "toy.yaml", "--teacher-url", f"{kserve}/v2/models/fp32",
                    "--generator", toy / "generator.pt", "--out", tmp_path / "run")
    assert_user_error(result, "its input is FP32", "teacher.input_preset")
    assert ledger_rows(tmp_path / "run" / "ledger.sqlite") == []


def test_evaluate_pays_for_teacher_accuracy_and_fidelity_apart_from_the_pool(kserve, toy, model, tmp_path):
    from b2kd.data import load_dataset
    from b2kd.evaluate.fidelity import sample
    from b2kd.models import load_classifier

    out = tmp_path / "run"
    distill = ["distill", "--config", toy / "toy.yaml", "--teacher-url", f"{kserve}/v2/models/logits",
               "--generator", toy / "generator.pt", "--out", out, "teacher.output=logits"]
    assert_ok(invoke(*distill))
    result = invoke("evaluate", out, "--pay-fidelity", 30)
    assert_ok(result)
    assert "fidelity from 30 paid test images (30 paid now, 30 in all" in result.stdout

    test = load_dataset("npz", "test", str(toy / "data.npz"))
    idx = sample(30, len(test), seed=0)
    teacher_pred = LocalBackend(model).infer(test.images[idx]).responses.argmax(1)
    student, _ = load_classifier(out / "checkpoints" / "best.pt")
    student_pred = student.eval()(test.images[idx]).argmax(1)
    report = json.loads((out / "report.json").read_text())
    assert report["teacher_acc"] == float((teacher_pred == test.labels[idx]).float().mean())
    assert report["fidelity"] == float((student_pred == teacher_pred).float().mean())
    assert report["queries"] == 200 and report["fidelity_images"] == report["fidelity_queries"] == 30
    assert "on 30 test images paid for" in (out / "report.md").read_text()
    rows = ledger_rows(out / "ledger.sqlite")
    assert rows.count(("soft", "distill")) == 200 and rows.count(("soft", "fidelity")) == 30

    assert_ok(invoke("evaluate", out, "--pay-fidelity", 30))  # cached: nothing paid again
    assert_ok(invoke(*distill))  # resumes within its budget: fidelity queries spend none of it
    assert ledger_rows(out / "ledger.sqlite") == rows
    assert_user_error(invoke("evaluate", out, "--pay-fidelity", 0), "--pay-fidelity takes a number")
