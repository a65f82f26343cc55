"""Gray-box answers: the teacher's embedding served, read, validated, stored and trained on."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from served import ThreadServer, images, toy_model
from test_cli import assert_ok, assert_user_error, invoke, ledger_rows
from toy import make_toy

from b2kd.blackbox import LocalBackend, ResponseKind
from b2kd.blackbox.protocol import EMBEDDING, Layout, ProtocolError
from b2kd.blackbox.validate import InvalidAnswer, embedding_problem
from b2kd.distill.feature_match import FeatureMatch
from b2kd.edge import BlackBoxTeacher, Ledger
from b2kd.edge.client import HTTPTeacher
from b2kd.edge.ledger import PoisonedLedger
from b2kd.models.penultimate import Penultimate, embed
from b2kd.provider.serve import ServedTeacher

KEY, PLAIN = "sk-gray", "sk-plain"


def test_kind_parses_and_prints():
    kind = ResponseKind.parse("embedding")
    assert (kind.name, kind.embedding, str(kind)) == ("soft", True, "soft+embedding")
    assert ResponseKind.parse("hard+embedding").is_hard and ResponseKind.parse("hard+embedding").embedding
    assert str(ResponseKind.parse("topk:3+embedding").base) == "topk:3"
    assert not ResponseKind.parse("soft").embedding
    assert ResponseKind.parse("soft+embedding").wire_bytes(10, 84) == 40 + 4 * 84


def test_penultimate_is_the_output_layers_input():
    model = toy_model()  # LeNet-5: ... Linear(120, 84), ReLU, Linear(84, 10)
    x = images(5)
    logits, feats = embed(model, x)
    assert feats.shape == (5, 84)
    last = model.classifier[-1]
    assert torch.allclose(last(feats), logits, atol=1e-5)  # the features give the logits
    assert (feats >= 0).all()  # after the ReLU
    with Penultimate(model) as hook:
        model(x)
        assert hook.last.shape == (5, 84)
    assert not last._forward_pre_hooks  # closed: the model is as it was


def test_local_backend_answers_embeddings():
    model = toy_model()
    backend = LocalBackend(model, "soft+embedding")
    answer = backend.infer(images(4))
    plain = LocalBackend(model, "soft").infer(images(4))
    assert torch.equal(answer.responses, plain.responses)
    assert answer.embeddings.shape == (4, 84) and backend.embedding_dim == 84
    assert torch.allclose(answer.embeddings, embed(model, images(4))[1])
    assert answer.bytes_received == [40 + 4 * 84] * 4 and plain.bytes_received == [40] * 4
    assert plain.embeddings is None


def test_embedding_validation():
    assert embedding_problem(torch.ones(3, 4), 3, 4) is None
    assert "shape" in embedding_problem(torch.ones(3, 5), 3, 4)
    assert "shape" in embedding_problem(torch.ones(2, 4), 3, 4)
    bad = torch.ones(3, 4)
    bad[1, 2] = float("nan")
    assert "row 1" in embedding_problem(bad, 3, 4)
    bad[1, 2] = 1e9
    assert "below" in embedding_problem(bad, 3, 4)
    assert embedding_problem(None, 3, 4) == "the answer has no embedding"


def test_ledger_stores_and_counts_embeddings(tmp_path):
    model = toy_model()
    teacher = BlackBoxTeacher(LocalBackend(model, "soft+embedding"), Ledger(tmp_path / "l.sqlite"), budget=10)
    x = images(6)
    teacher.query(x[:4])
    emb = teacher.embeddings(x)
    assert torch.allclose(emb[:4], embed(model, x[:4])[1])
    assert torch.isnan(emb[4:]).all()  # not paid: no embedding, and nothing was sent
    assert teacher.spent == 4
    assert teacher.ledger.totals()["bytes_received"] == 4 * (40 + 4 * 84)
    # a +embedding answer without its embedding is never recorded
    with pytest.raises(InvalidAnswer, match="no embedding"):
        teacher.ledger.record(["h"], x[:1], torch.full((1, 10), 0.1), "soft+embedding", [1], [1], "distill")
    # a stored embedding that is not finite is refused, then cleaned
    teacher.ledger._db.execute("UPDATE queries SET embedding = ? WHERE id = 1",
                               (np.full(84, np.inf, dtype=np.float32).tobytes(),))
    teacher.ledger._db.commit()
    with pytest.raises(PoisonedLedger, match="invalid embeddings"):
        teacher.embeddings(x[:1])
    assert teacher.ledger.clean() == (1, 3)


def test_old_ledger_gains_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE queries (id INTEGER PRIMARY KEY AUTOINCREMENT, hash TEXT NOT NULL,
        kind TEXT NOT NULL, bytes_sent INTEGER NOT NULL, bytes_received INTEGER NOT NULL,
        response BLOB NOT NULL, image BLOB, shape TEXT NOT NULL, stage TEXT NOT NULL,
        created REAL NOT NULL, UNIQUE (hash, kind));""")
    db.close()
    with Ledger(path) as ledger:
        teacher = BlackBoxTeacher(LocalBackend(toy_model(), "soft+embedding"), ledger)
        teacher.query(images(2))
        assert not torch.isnan(teacher.embeddings(images(2))).any()


def test_layout_round_trip_and_metadata():
    layout = Layout.of("soft+embedding", 10, 84)
    assert {o["name"]: o["shape"] for o in layout.metadata()}[EMBEDDING] == [-1, 84]
    api, emb = torch.softmax(torch.randn(3, 10), 1), torch.randn(3, 84)
    outputs = layout.to_outputs(api, emb)
    assert torch.equal(layout.from_outputs(outputs, 3), api)
    assert torch.equal(layout.embeddings_from_outputs(outputs, 3), emb)
    with pytest.raises(ProtocolError, match="shape"):
        layout.embeddings_from_outputs({**outputs, EMBEDDING: np.zeros((3, 5), np.float32)}, 3)
    read = Layout.from_metadata(layout.metadata(), "soft+embedding", 10)
    assert read == layout
    # a third-party server: the client names the embedding output
    third = [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]},
             {"name": "pooled", "datatype": "FP32", "shape": [-1, 2048]}]
    got = Layout.from_metadata(third, None, None, embedding_output="pooled")
    assert str(got.kind) == "soft+embedding" and got.embedding_dim == 2048
    with pytest.raises(ProtocolError, match="no output 'feats'"):
        Layout.from_metadata(third, None, None, embedding_output="feats")


@pytest.fixture(scope="module")
def gray_server():
    with ThreadServer(toy_model(), "soft+embedding", api_keys={KEY: None, PLAIN: None},
                      key_outputs={PLAIN: ["probabilities"]}) as s:
        yield s


@pytest.mark.parametrize("binary", [True, False])
def test_http_client_reads_embeddings(gray_server, binary, tmp_path):
    model = toy_model()
    client = HTTPTeacher(gray_server.url, KEY, binary=binary)
    try:
        assert str(client.kind) == "soft+embedding" and client.embedding_dim == 84
        x = images(5)
        answer = client.infer(x)
        local = LocalBackend(model, "soft+embedding").infer(x)
        assert torch.allclose(answer.responses, local.responses, atol=1e-6)
        assert torch.allclose(answer.embeddings, local.embeddings, atol=1e-5)
        # the bytes that travelled, which the ledger counts: the embedding is most of them
        teacher = BlackBoxTeacher(client, Ledger(tmp_path / "l.sqlite"))
        teacher.query(x)
        per_query = teacher.ledger.totals()["bytes_received"] / 5
        assert per_query > 4 * 84 if binary else per_query > 8 * 84
        plain = HTTPTeacher(gray_server.url, KEY, binary=binary)
        plain.without_embedding()
        plain_teacher = BlackBoxTeacher(plain, Ledger(tmp_path / "p.sqlite"))
        assert torch.allclose(plain_teacher.query(x), local.responses, atol=1e-6)
        assert plain_teacher.ledger.totals()["bytes_received"] / 5 < per_query - 4 * 84
        plain.close()
    finally:
        client.close()


def test_metadata_says_so_and_keys_choose_outputs(gray_server):
    meta = httpx.get(gray_server.url, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert meta["parameters"]["response"] == "soft+embedding"
    assert meta["parameters"]["embedding_dim"] == 84
    assert EMBEDDING in [o["name"] for o in meta["outputs"]]
    restricted = HTTPTeacher(gray_server.url, PLAIN)
    try:
        with pytest.raises(Exception, match="may not read output 'embedding'"):
            restricted.infer(images(2))
        restricted.without_embedding()  # what b2kd does when the run asks for soft answers
        assert restricted.infer(images(2)).embeddings is None
    finally:
        restricted.close()


def test_unknown_key_outputs_are_refused():
    with pytest.raises(ValueError, match="does not have"):
        ThreadServer(toy_model(), "soft+embedding", api_keys={KEY: None}, key_outputs={KEY: ["logits"]})
    with pytest.raises(ValueError, match="not among the API keys"):
        ThreadServer(toy_model(), "soft+embedding", api_keys={KEY: None}, key_outputs={"x": ["probabilities"]})


def test_feature_match_term_by_hand():
    torch.manual_seed(0)
    student = toy_model()
    emb = torch.randn(6, 7) * 3
    emb[5] = float("nan")  # a reused setup answer: no embedding
    fm = FeatureMatch(student, emb, weight=0.5, device=torch.device("cpu"), seed=1)
    x, idx = images(3), torch.tensor([0, 5, 2])
    fm.arm()
    student(x)
    student(images(2, seed=9))  # a later pass (the unlabelled term) is not the one matched
    term, parts = fm.loss(idx)
    feats = embed(student, x)[1]
    scale = emb[:5].pow(2).mean().sqrt()
    rows = [0, 2]
    diff = fm.proj(feats[[0, 2]]) - emb[rows] / scale
    expected = 0.5 * diff.pow(2).mean() * (2 / 3)
    assert torch.allclose(term, expected, atol=1e-6) and parts["feat"] == pytest.approx(float(expected.detach()))
    fm.arm()
    student(images(1))
    with pytest.raises(RuntimeError, match="once on the batch of 3"):
        fm.loss(idx)
    fm.close()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"), toy_model())


def test_serve_embedding_cli_then_distill_with_feature_matching(toy, tmp_path):
    """`b2kd serve --response embedding` in its own process; `b2kd distill` over HTTP pays for
    soft+embedding answers, stores each embedding, trains the feature term; a key kept to the
    probabilities distils from soft answers of the same server."""
    import json
    import sqlite3

    server_dir, out, plain_out = tmp_path / "server", tmp_path / "run", tmp_path / "plain"
    with ServedTeacher(toy / "teacher.pt", server_dir, "embedding", api_keys=("k", "p")) as server:
        result = invoke("distill", "--config", toy / "toy.yaml", "--teacher-url", server.url,
                        "--api-key", "k", "--generator", toy / "generator.pt", "--out", out,
                        "--response", "soft+embedding")
        assert_ok(result)
    with ServedTeacher(toy / "teacher.pt", server_dir, "embedding", api_keys=("k", "p"),
                       overrides=("--key-outputs", "p=probabilities")) as server:
        refused = invoke("distill", "--config", toy / "toy.yaml", "--teacher-url", server.url,
                         "--api-key", "p", "--generator", toy / "generator.pt", "--out", tmp_path / "r",
                         "--response", "soft+embedding")
        assert_user_error(refused, "may not read output 'embedding'")
        result = invoke("distill", "--config", toy / "toy.yaml", "--teacher-url", server.url,
                        "--api-key", "p", "--generator", toy / "generator.pt", "--out", plain_out)
        assert_ok(result)
    rows = ledger_rows(out / "ledger.sqlite")
    assert rows == [("soft+embedding", "distill")] * 200
    db = sqlite3.connect(out / "ledger.sqlite")
    sizes = {len(blob) for (blob,) in db.execute("SELECT embedding FROM queries")}
    gray = db.execute("SELECT SUM(bytes_received) FROM queries").fetchone()[0]
    db.close()
    assert sizes == {4 * 84}  # LeNet-5's 84 penultimate values, float32
    db = sqlite3.connect(plain_out / "ledger.sqlite")
    soft = db.execute("SELECT SUM(bytes_received), COUNT(embedding) FROM queries").fetchone()
    db.close()
    assert soft[1] == 0 and gray > soft[0] + 200 * 4 * 84  # the embedding travelled, and was paid in bytes
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(m["feat"] > 0 for m in metrics)
    summary = json.loads((out / "distill.json").read_text())
    assert (summary["embedding_dim"], summary["with_embedding"]) == (84, 200)
    assert json.loads((plain_out / "distill.json").read_text())["embedding_dim"] is None


def test_engine_saves_and_restores_the_projection(tmp_path):
    """A resumed gray-box run continues with its trained projection, not a fresh one."""
    from b2kd.core.engine import Engine, make_optimizer, make_step_scheduler

    def engine(model, proj):
        opt = make_optimizer(model, 0.1, 0.9, 0.0)
        opt.add_param_group({"params": list(proj.parameters())})
        sched = make_step_scheduler(opt, "cosine", 4)
        return Engine(tmp_path, model, opt, sched, 2, seed=0, select="last", schedule_per="step",
                      extras={"feature_projection": proj})

    torch.manual_seed(0)
    model, proj = toy_model(), torch.nn.Linear(84, 7)
    first = engine(model, proj)

    def epoch(e, rng):
        first.optimizer.zero_grad()
        (model(images(4)).sum() + proj(torch.ones(1, 84)).sum()).backward()
        first.optimizer.step()
        return {"loss": 0.0}

    first.epochs = 1
    first.run(epoch)
    trained = {k: v.clone() for k, v in proj.state_dict().items()}
    torch.manual_seed(1)
    fresh = torch.nn.Linear(84, 7)
    again = engine(toy_model(), fresh)
    assert again.resume() and again.start_epoch == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())
