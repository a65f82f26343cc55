"""HTTPTeacher against real servers on 127.0.0.1: exact answers, bytes on the wire, 429, kill -9, CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
import torch
import yaml
from served import ThreadServer, images, toy_model
from test_cli import assert_ok, assert_user_error, invoke, ledger_rows
from toy import make_toy

from b2kd.blackbox import BlackBoxError, LocalBackend
from b2kd.blackbox.protocol import ProtocolError
from b2kd.edge import BlackBoxTeacher, Ledger, image_hashes
from b2kd.edge.client import HTTPTeacher, InputOverride, retry_after, split_url
from b2kd.pool.paid import pay
from b2kd.provider.keys import key_id, load_secret
from b2kd.provider.serve import ServedTeacher

KINDS = ["soft", "topk:3", "rounded:2", "hard"]
PIXELS = 28 * 28


@pytest.fixture(scope="module")
def model():
    return toy_model()


@pytest.fixture(scope="module")
def servers(model):
    """One open server per response kind, in threads of this process."""
    running = {kind: ThreadServer(model, kind).__enter__() for kind in KINDS}
    yield running
    for s in running.values():
        s.__exit__()


def metric(root: str, sample: str) -> float:
    """The sum of the /metrics samples named ``sample``, or starting with it ('name{label="v"')."""
    text = httpx.get(root + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")
               and (line.split("{")[0].split(" ")[0] == sample or ("{" in sample and line.startswith(sample))))


def test_urls_and_retry_after_are_understood():
    assert split_url("http://h:1") == ("http://h:1", "/v2/models/teacher")
    assert split_url("https://h/api/v2/models/m/versions/2/") == ("https://h/api", "/v2/models/m/versions/2")
    for bad in ("localhost:8000", "ftp://h/x", "http://"):
        with pytest.raises(BlackBoxError, match="must look like"):
            split_url(bad)
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    for header, low, high in (("3", 3, 3), ("0.5", 0.5, 0.5), (later, 25, 30), ("soon", None, None)):
        waited = retry_after(httpx.Response(429, headers={"Retry-After": header}))
        assert (waited is None) if low is None else low <= waited <= high, header


def test_the_image_input_is_the_metadatas_unless_the_user_names_it():
    spec = HTTPTeacher._input_spec
    one = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]}
    assert spec(one, InputOverride()) == ("x", "UINT8", None, (1, 28, 28))
    # a wrong datatype and a fixed batch in the metadata, corrected one key at a time
    fixed = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [8, 1, 28, 28]}]}
    assert spec(fixed, InputOverride(datatype="FP16")) == ("x", "FP16", 8, (1, 28, 28))
    assert spec(fixed, InputOverride.checked(None, "FP32", [1, 28, 28])) == ("x", "FP32", None, (1, 28, 28))
    named = InputOverride.checked("pixels", "FP32", [4, 3, 32, 32])
    for empty in ({"inputs": []}, {}, {"inputs": None}):  # kserve's default, none, null
        with pytest.raises(ProtocolError, match="metadata lists .* name it with teacher.input_name"):
            spec(empty, InputOverride(name="pixels"))
        assert spec(empty, named) == ("pixels", "FP32", 4, (3, 32, 32))
    two = {"inputs": [{"name": "mask", "datatype": "BOOL", "shape": [-1, 1]}, one["inputs"][0]]}
    with pytest.raises(ProtocolError, match="lists 2 inputs"):
        spec(two, InputOverride())
    assert spec(two, InputOverride(name="x")) == ("x", "UINT8", None, (1, 28, 28))
    for bad, needle in (((None, "INT8", None), "input_datatype must be one of"),
                        ((None, None, [0, 28, 28]), "input_shape must be"),
                        ((None, None, [-2, 1, 28, 28]), "input_shape must be"),
                        ((None, None, [1, 28]), "input_shape must be"), (("", None, None), "non-empty")):
        with pytest.raises(BlackBoxError, match=needle):
            InputOverride.checked(*bad)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("kind", KINDS)
def test_answers_equal_the_in_process_backend(servers, model, kind, binary):
    x = images(300, seed=1)  # two requests: 256 + 44
    with HTTPTeacher(servers[kind].url, binary=binary) as backend:
        assert str(backend.kind) == kind and backend.num_classes == 10 and backend.image_shape == (1, 28, 28)
        answer = backend.infer(x)
    expected = LocalBackend(model, kind).infer(x).responses
    torch.testing.assert_close(answer.responses, expected, rtol=0, atol=0, equal_nan=True)
    assert len(answer.bytes_sent) == len(answer.bytes_received) == 300


def test_bytes_on_the_wire_are_body_bytes_as_the_server_saw_them(model, tmp_path):
    with ThreadServer(model, "soft") as s:
        with HTTPTeacher(s.url, batch_size=256) as backend:
            teacher = BlackBoxTeacher(backend, Ledger(tmp_path / "ledger.sqlite"), batch_size=256)
            teacher.query(images(512, seed=2))
            big = teacher.ledger.totals()
            assert big["bytes_sent"] == metric(s.root, "b2kd_request_bytes_total")
            assert big["bytes_received"] == metric(s.root, "b2kd_response_bytes_total")
            teacher.query(images(512, seed=2))  # all cached: nothing travels
            assert teacher.ledger.totals() == big and metric(s.root, "b2kd_queries_total") == 512
            assert PIXELS < big["bytes_sent"] / 512 <= PIXELS * 1.01  # 1 byte per pixel + the header
            assert 40 < big["bytes_received"] / 512 <= 41  # 10 float32 + the header
        with HTTPTeacher(s.url, batch_size=16) as backend:  # deprivatize-sized requests
            answer = backend.infer(images(64, seed=3))
            assert max(answer.bytes_sent) <= PIXELS * 1.05
        with HTTPTeacher(s.url, binary=False) as backend:  # JSON lists of numbers cost far more
            assert min(backend.infer(images(64, seed=4)).bytes_sent) > 2 * PIXELS


def test_a_batch_sent_again_by_a_fresh_client_is_replayed_not_charged(model):
    x = images(32, seed=6)
    with ThreadServer(model, "hard", api_keys={"k": None}) as s:
        answers = []
        for _ in range(2):  # as a run killed before its ledger committed would send it again
            with HTTPTeacher(s.url, "k") as backend:
                answers.append(backend.infer(x).responses)
        assert metric(s.root, "b2kd_queries_total") == 32
        assert metric(s.root, "b2kd_replayed_queries_total") == 32
    assert torch.equal(answers[0], answers[1])


def test_a_tight_rate_limit_slows_the_client_down_and_it_completes(model, tmp_path):
    with ThreadServer(model, "hard", rate_limit=2.0, burst=4) as s:
        with HTTPTeacher(s.url, batch_size=4) as backend:
            teacher = BlackBoxTeacher(backend, Ledger(tmp_path / "ledger.sqlite"), batch_size=4)
            start = time.monotonic()
            out = pay(teacher, images(40, seed=5), chunk=40)  # 10 requests, 4 at once, then 2 per second
            elapsed = time.monotonic() - start
        refusals = metric(s.root, 'b2kd_refusals_total{reason="rate_limit"')
        assert metric(s.root, "b2kd_queries_total") == 40
    assert out.shape == (40, 10) and teacher.ledger.count() == 40
    assert refusals >= 1 and elapsed >= 1.0


# --- a real `b2kd serve` process -----------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(model, tmp_path_factory):
    """A teacher checkpoint, a generator, a random .npz dataset and a toy config for the CLI."""
    return make_toy(tmp_path_factory.mktemp("http-toy"), model)


def server_used(server_dir, key: str) -> int:
    with sqlite3.connect(server_dir / "state.sqlite") as db:
        kid = key_id(key, load_secret(server_dir / "secret", create=False))  # the server's keyed hash
        return db.execute("SELECT used FROM keys WHERE key_id = ?", (kid,)).fetchone()[0]


def paid(ledger_path) -> int:
    if not ledger_path.is_file():
        return 0
    with sqlite3.connect(ledger_path) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM queries").fetchone()[0]
        except sqlite3.OperationalError:  # the table is not there yet
            return 0


def test_server_killed_mid_pool_restarts_and_each_image_is_paid_once(toy, model, tmp_path):
    server_dir, ledger_path = tmp_path / "server", tmp_path / "ledger.sqlite"
    pool = images(1600, seed=21)
    server = ServedTeacher(toy / "teacher.pt", server_dir, "soft", api_keys=("k:100000",)).start().wait()
    restarted = ServedTeacher(toy / "teacher.pt", server_dir, "soft", api_keys=("k:100000",), port=server.port)
    result, errors = {}, []

    def client() -> None:
        try:
            with HTTPTeacher(server.url, "k", batch_size=8, backoff=0.2, retries=10) as backend:
                teacher = BlackBoxTeacher(backend, Ledger(ledger_path), batch_size=8)
                result["responses"] = pay(teacher, pool, chunk=64)
                teacher.ledger.close()
        except Exception as exc:  # noqa: BLE001 -- any failure is reported on the test's thread
            errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while paid(ledger_path) < 64:
            assert time.monotonic() < deadline and thread.is_alive(), errors
            time.sleep(0.002)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        paid_at_kill = paid(ledger_path)
        restarted.start().wait()
        thread.join(timeout=300)
    finally:
        server.stop()
        restarted.stop()
    assert not errors and not thread.is_alive(), errors
    assert paid_at_kill < len(pool), "the pool was paid before the server could be killed"
    with Ledger(ledger_path) as ledger:
        assert ledger.count() == len(pool)
        assert ledger.sent_hashes() == set(image_hashes(pool))
    assert server_used(server_dir, "k") == len(pool)  # each image charged exactly once
    torch.testing.assert_close(result["responses"], LocalBackend(model).infer(pool).responses,
                               rtol=0, atol=1e-6)


def distill_over_http(toy, out, url, *extra):
    return invoke("distill", "--config", toy / "toy.yaml", "--teacher-url", url, "--api-key", "k",
                  "--generator", toy / "generator.pt", "--out", out, *extra)


def test_distill_over_http_stops_at_the_quota_and_resumes_with_more(toy, tmp_path):
    server_dir, out = tmp_path / "server", tmp_path / "run"
    with ServedTeacher(toy / "teacher.pt", server_dir, "soft", api_keys=("k:150",)) as server:
        result = distill_over_http(toy, out, server.url)
        port = server.port  # the same provider (URL) again below: its answers are not mixed with another's
    # the third request of 64 is refused at 128 of 150: it shrinks to the 22 left, spending the quota
    assert_user_error(result, "quota", "128 of 150", "the last 22 queries it allowed were paid and kept")
    assert ledger_rows(out / "ledger.sqlite") == [("soft", "distill")] * 150  # paid answers kept
    assert server_used(server_dir, "k") == 150
    assert not (out / "checkpoints").exists()

    with ServedTeacher(toy / "teacher.pt", server_dir, "soft", api_keys=("k:1000",), port=port) as server:
        result = distill_over_http(toy, out, server.url, "--teacher", toy / "teacher.pt")
    assert_ok(result)
    assert ledger_rows(out / "ledger.sqlite") == [("soft", "distill")] * 200
    assert server_used(server_dir, "k") == 200
    report = json.loads((out / "report.json").read_text())
    assert report["queries"] == 200 and report["fidelity"] is not None  # from the local checkpoint
    assert PIXELS * 200 < report["bytes_sent"] <= PIXELS * 200 * 1.05
    assert "api_key" not in yaml.safe_load((out / "config.yaml").read_text())["teacher"]  # no secrets


def test_deprivatize_over_http_and_clear_errors(toy, tmp_path):
    with ServedTeacher(toy / "teacher.pt", tmp_path / "server", "hard", api_keys=("k",)) as server:
        common = ["deprivatize", "--config", toy / "toy.yaml", "--teacher-url", server.url]
        mismatch = invoke(*common, "--api-key", "k", "--out", tmp_path / "soft")
        wrong_key = invoke(*common, "--api-key", "nope", "--response", "hard", "--out", tmp_path / "bad")
        ok = invoke(*common, "--api-key", "k", "--response", "hard", "--out", tmp_path / "hard")
        no_fidelity = distill_over_http(toy, tmp_path / "distill", server.url, "--response", "hard")
    bad_url = invoke("deprivatize", "--config", toy / "toy.yaml", "--teacher-url", "localhost:8000",
                     "--out", tmp_path / "url")
    assert_user_error(bad_url, "must look like http://HOST:PORT[/v2/models/NAME]")  # not Rich markup
    assert_user_error(mismatch, "answers 'hard' responses but deprivatize.response is 'soft'")
    assert_user_error(wrong_key, "refused the API key")
    assert ledger_rows(tmp_path / "soft" / "ledger.sqlite") == []
    assert_ok(ok)
    rows = ledger_rows(tmp_path / "hard" / "ledger.sqlite")
    assert rows and set(rows) == {("hard", "deprivatize")}
    assert json.loads((tmp_path / "hard" / "report.json").read_text())["private_images_sent"] == 0
    assert_ok(no_fidelity)  # no local teacher: the report has no teacher accuracy or fidelity
    assert "fidelity -" in no_fidelity.stdout
    assert json.loads((tmp_path / "distill" / "report.json").read_text())["fidelity"] is None
