"""The teacher server against raw HTTP on 127.0.0.1: protocol conformance, limits, quotas, hostile input."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from served import ThreadServer, images, raw_head, raw_request, read_status, toy_model

from b2kd.blackbox import LocalBackend, QuotaExceeded
from b2kd.blackbox.protocol import HEADER_LENGTH, Tensor, encode
from b2kd.edge import BlackBoxTeacher, Ledger
from b2kd.edge.client import HTTPTeacher

KEY, OTHER = "sk-test-key", "sk-other-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model():
    return toy_model()


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """A soft-response server with two keys, small limits, state and access log on disk."""
    tmp = tmp_path_factory.mktemp("server")
    with ThreadServer(model, "soft", api_keys={KEY: None, OTHER: 5}, max_batch=64,
                      state=tmp / "state.sqlite", access_log=tmp / "access.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.root, headers=AUTH, timeout=30) as c:
        yield c


def infer_body(x: torch.Tensor, binary: bool, request_id: str | None = None,
               binary_output: bool | None = None, outputs: list | None = None) -> tuple[bytes, dict]:
    header: dict = {} if request_id is None else {"id": request_id}
    if binary_output is not None:
        header["parameters"] = {"binary_data_output": binary_output}
    if outputs is not None:
        header["outputs"] = outputs
    body, length = encode(header, "inputs", [Tensor("images", x.numpy(), binary)])
    return body, ({HEADER_LENGTH: str(length)} if length is not None else {})


def wait_for_log(path, wanted, timeout: float = 30.0) -> list[dict]:
    """The access-log records that match ``wanted``, once there is one (the log is written by a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.is_file() else []
        found = [r for r in map(json.loads, lines) if wanted(r)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def metric(client: httpx.Client, name: str) -> float:
    """The sum of a metric's samples in /metrics (all labels)."""
    text = client.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


def used(server, key: str) -> int:
    return server.app.state.store.usage()[server.app.state.key_id(key)][0]


# --- conformance -------------------------------------------------------------------------------


def test_health_server_and_model_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert "binary_tensor_data" in client.get("/v2").json()["extensions"]
    meta = client.get("/v2/models/teacher").json()
    assert meta["name"] == "teacher" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["response"] == "soft"
    assert client.get("/v2/models/teacher/versions/1").json() == meta
    assert client.get("/v2/models/teacher/ready").json() == {"name": "teacher", "ready": True}
    for path in ("/v2/models/nope", "/v2/models/teacher/versions/2", "/v2/models/nope/ready"):
        r = client.get(path)
        assert r.status_code == 404 and "unknown model" in r.json()["error"]
    assert client.get("/v2/nothing").status_code == 404


@pytest.mark.parametrize("kind,outputs", [
    ("soft", [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]),
    ("hard", [{"name": "label", "datatype": "INT32", "shape": [-1]}]),
    ("topk:3", [{"name": "topk_indices", "datatype": "INT32", "shape": [-1, 3]},
                {"name": "topk_values", "datatype": "FP32", "shape": [-1, 3]}]),
    ("rounded:2", [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]),
])
def test_metadata_outputs_of_every_response_kind(model, kind, outputs):
    with ThreadServer(model, kind) as s:
        meta = httpx.get(s.url).json()
    assert meta["outputs"] == outputs and meta["parameters"]["response"] == kind


def test_json_infer_answers_like_the_model(client, model):
    x = images(3)
    body, headers = infer_body(x, binary=False, request_id="json-1")
    r = client.post("/v2/models/teacher/infer", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = r.json()
    assert out["model_name"] == "teacher" and out["model_version"] == "1" and out["id"] == "json-1"
    (probs,) = out["outputs"]
    assert probs["name"] == "probabilities" and probs["datatype"] == "FP32" and probs["shape"] == [3, 10]
    expected = LocalBackend(model).infer(x).responses
    assert torch.allclose(torch.tensor(probs["data"]).reshape(3, 10), expected, atol=1e-6)


def test_binary_infer_and_output_choices(client, model):
    x = images(4, seed=1)
    expected = LocalBackend(model).infer(x).responses.numpy()
    body, headers = infer_body(x, binary=True, binary_output=True)
    r = client.post("/v2/models/teacher/infer", content=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    length = int(r.headers[HEADER_LENGTH])
    head = json.loads(r.content[:length])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 4 * 10 * 4}
    assert len(r.content) == length + 160
    assert np.allclose(np.frombuffer(r.content[length:], "<f4").reshape(4, 10), expected, atol=1e-6)
    # binary images in, JSON answer out (no binary output asked for)
    body, headers = infer_body(x, binary=True)
    r = client.post("/v2/models/teacher/infer", content=body, headers=headers)
    assert HEADER_LENGTH not in r.headers and r.json()["outputs"][0]["shape"] == [4, 10]
    # per-output binary_data overrides the request-level choice
    body, headers = infer_body(x, binary=False, binary_output=False,
                               outputs=[{"name": "probabilities", "parameters": {"binary_data": True}}])
    r = client.post("/v2/models/teacher/infer", content=body, headers=headers)
    assert int(r.headers[HEADER_LENGTH]) == len(r.content) - 160


# --- limits, keys, idempotency -------------------------------------------------------------------


def test_batch_and_body_limits_are_413(client, model, tmp_path):
    body, headers = infer_body(images(65), binary=True)
    r = client.post("/v2/models/teacher/infer", content=body, headers=headers)
    assert r.status_code == 413 and "at most 64" in r.json()["error"]
    with ThreadServer(model, max_body_bytes=5000) as small:
        body, headers = infer_body(images(8), binary=True)
        r = httpx.post(small.url + "/infer", content=body, headers=headers)
        assert r.status_code == 413 and "at most 5000" in r.json()["error"]
        body, headers = infer_body(images(2), binary=True)  # the server goes on serving
        assert httpx.post(small.url + "/infer", content=body, headers=headers).status_code == 200


def test_keys_are_required_and_checked(server):
    body, headers = infer_body(images(1), binary=True)
    for auth, needle in (({}, "missing API key"), ({"Authorization": "Bearer wrong"}, "unknown API key"),
                         ({"Authorization": f"Basic {KEY}"}, "missing API key")):
        r = httpx.post(server.url + "/infer", content=body, headers={**headers, **auth})
        assert r.status_code == 401 and needle in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"


def test_a_repeated_request_id_is_replayed_free_and_a_reused_one_refused(client, server):
    x = images(6, seed=2)
    before = used(server, KEY)
    body, headers = infer_body(x, binary=True, request_id="same-id", binary_output=True)
    first = client.post("/v2/models/teacher/infer", content=body, headers=headers)
    again = client.post("/v2/models/teacher/infer", content=body, headers=headers)
    assert first.status_code == again.status_code == 200 and first.content == again.content
    assert used(server, KEY) == before + 6  # charged once
    other, headers = infer_body(images(6, seed=3), binary=True, request_id="same-id", binary_output=True)
    r = client.post("/v2/models/teacher/infer", content=other, headers=headers)
    assert r.status_code == 409 and "different body" in r.json()["error"]
    assert used(server, KEY) == before + 6


def test_quota_is_402_and_nothing_is_charged_beyond_it(server):
    body, headers = infer_body(images(6, seed=4), binary=True)
    r = httpx.post(server.url + "/infer", content=body,
                   headers={**headers, "Authorization": f"Bearer {OTHER}"})
    assert r.status_code == 402 and "quota exhausted: 0 of 5" in r.json()["error"]
    assert used(server, OTHER) == 0


def test_rate_limit_is_429_with_retry_after(model):
    with ThreadServer(model, rate_limit=1.0, burst=2) as s:
        body, headers = infer_body(images(1), binary=True)
        codes = [httpx.post(s.url + "/infer", content=body, headers=headers) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert codes[2].headers["retry-after"] == "1" and "rate limit" in codes[2].json()["error"]


def test_quota_holds_under_8_concurrent_clients_on_one_key(model, tmp_path):
    quota, clients, per_client, batch = 300, 8, 64, 8
    refused = []
    with ThreadServer(model, api_keys={KEY: quota}, state=tmp_path / "state.sqlite") as s:

        def hammer(i: int) -> None:
            with HTTPTeacher(s.url, KEY, batch_size=batch) as backend:
                teacher = BlackBoxTeacher(backend, Ledger(tmp_path / f"ledger-{i}.sqlite"), batch_size=batch)
                try:
                    for start in range(0, per_client, batch):
                        teacher.query(images(per_client, seed=100 + i)[start : start + batch])
                except QuotaExceeded:
                    refused.append(i)
                teacher.ledger.close()

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        charged = used(s, KEY)
        with httpx.Client(base_url=s.root) as c:
            assert metric(c, "b2kd_queries_total") == charged
            assert metric(c, "b2kd_refusals_total") >= 1
    paid = sum(Ledger(tmp_path / f"ledger-{i}.sqlite").count() for i in range(clients))
    assert refused, "the demand (512) exceeds the quota (300): someone must be refused"
    # the client's last request shrinks to what the 402 says is left: the quota is spent to the last query
    assert charged == paid == quota


# --- metrics and log (hostile input: test_fuzz_server.py) ----------------------------------


def test_metrics_and_access_log(server, client):
    body, headers = infer_body(images(2, seed=11), binary=True, binary_output=True)
    assert client.post("/v2/models/teacher/infer", content=body, headers=headers).status_code == 200
    text = client.get("/metrics").text
    for name in ("b2kd_http_requests_total", "b2kd_queries_total", "b2kd_request_bytes_total",
                 "b2kd_response_bytes_total", "b2kd_refusals_total", "b2kd_infer_latency_seconds_bucket",
                 "b2kd_quota_used", "b2kd_quota_limit"):
        assert f"# TYPE {name.removesuffix('_bucket')}" in text and name in text, name
    assert f'b2kd_quota_limit{{key="{server.app.state.key_id(OTHER)}"}} 5.0' in text
    assert 'endpoint="/v2/models/{model}/infer",status="200"' in text
    infers = wait_for_log(server.app.state.settings.access_log,
                          lambda r: r["path"] == "/v2/models/teacher/infer" and r["status"] == 200)
    assert {"ms", "key", "queries", "bytes_in", "bytes_out"} <= set(infers[-1])
    assert infers[-1]["key"] == server.app.state.key_id(KEY) and infers[-1]["queries"] == 2
    log_text = server.app.state.settings.access_log.read_text()
    assert KEY not in log_text and OTHER not in log_text  # keys are never written down


# --- Triton's other calls, compressed bodies, reservations, hygiene, keys ----------------


class CountingBackend(LocalBackend):
    """A backend that counts the images it computed, slowly enough that requests overlap, and
    fails on request when ``fail`` is set."""

    def __init__(self, model, delay: float = 0.0):
        super().__init__(model, "soft")
        self.computed, self.delay, self.fail = 0, delay, False
        self._lock = threading.Lock()

    def infer(self, images):
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("the model broke")
        with self._lock:
            self.computed += len(images)
        return super().infer(images)


def test_triton_model_config_and_inference_statistics(model):
    with ThreadServer(model, "hard", max_batch=64) as s, httpx.Client(base_url=s.root) as c:
        config = c.get("/v2/models/teacher/config").json()
        assert c.get("/v2/models/teacher/versions/1/config").json() == config
        assert c.get("/v2/models/other/config").status_code == 404
        assert config["max_batch_size"] == 64 and config["name"] == "teacher"
        assert config["input"] == [{"name": "images", "data_type": "TYPE_UINT8", "dims": [1, 28, 28],
                                    "format": "FORMAT_NCHW"}]
        assert config["output"] == [{"name": "label", "data_type": "TYPE_INT32", "dims": [1],
                                     "reshape": {"shape": []}}]
        body, headers = infer_body(images(3), binary=True, request_id="stats-1")
        for _ in range(2):  # computed once, then replayed (Triton's cache hit)
            assert c.post("/v2/models/teacher/infer", content=body, headers=headers).status_code == 200
        body, headers = infer_body(images(5), binary=True)
        assert c.post("/v2/models/teacher/infer", content=body, headers=headers).status_code == 200
        bad = json.dumps({"inputs": [{"name": "images", "datatype": ["UINT8"], "shape": [1], "data": [1]}]})
        assert c.post("/v2/models/teacher/infer", content=bad).status_code == 400
        (stats,) = c.get("/v2/models/teacher/stats").json()["model_stats"]
        assert c.get("/v2/models/stats").json()["model_stats"][0]["inference_count"] == 11
    assert (stats["name"], stats["version"]) == ("teacher", "1")
    assert stats["inference_count"] == 3 + 3 + 5 and stats["execution_count"] == 2
    phases = stats["inference_stats"]
    assert phases["success"]["count"] == 3 and phases["fail"]["count"] == 1
    assert phases["cache_hit"]["count"] == 1 and phases["compute_infer"]["count"] == 2
    assert [b["batch_size"] for b in stats["batch_stats"]] == [3, 5]
    assert all(b["compute_infer"]["count"] == 1 for b in stats["batch_stats"])


def test_gzip_and_deflate_bodies_count_their_decompressed_size(model):
    import gzip
    import zlib

    x = images(4, seed=30)
    body, headers = infer_body(x, binary=True, binary_output=True)
    with ThreadServer(model, api_keys={KEY: None}, max_body_bytes=20_000) as s, \
            httpx.Client(base_url=s.root, headers=AUTH) as c:
        def post(content: bytes, encoding: str) -> httpx.Response:
            return c.post("/v2/models/teacher/infer", content=content,
                          headers={**headers, "Content-Encoding": encoding})

        plain = c.post("/v2/models/teacher/infer", content=body, headers=headers)
        assert plain.status_code == 200
        for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
            r = post(packed, encoding)
            assert r.status_code == 200 and r.content == plain.content, (encoding, r.text[:200])
        assert used(s, KEY) == 12
        # a bomb: 10 MB of zeros in 10 KB of gzip, refused once 20 KB came out
        bomb = gzip.compress(body + bytes(10_000_000))
        assert len(bomb) < 20_000
        r = post(bomb, "gzip")
        assert r.status_code == 413 and "decompressed" in r.json()["error"]
        for content, encoding, needle in (
                (b"not gzip at all", "gzip", "not valid gzip"),
                (gzip.compress(body)[:-9], "gzip", "truncated"),
                (gzip.compress(body) + b"trailing", "gzip", "after the end"),
                (zlib.compress(body)[:40], "deflate", "truncated"),
                (body, "br", "unsupported Content-Encoding")):
            r = post(content, encoding)
            assert 400 <= r.status_code < 500 and needle in r.json()["error"], (needle, r.text[:200])
        assert used(s, KEY) == 12  # refused bodies are not charged
        assert c.post("/v2/models/teacher/infer", content=body, headers=headers).status_code == 200


def test_concurrent_requests_never_compute_beyond_the_quota(model):
    """Before: 8 requests of 8 images on a quota of 16 ran the model 8 times (64 images computed)
    and were then refused; now the quota is reserved before the model runs."""
    backend = CountingBackend(model, delay=0.1)
    codes: list[int] = []
    with ThreadServer(backend, api_keys={KEY: 16}) as s:
        start = threading.Barrier(8)

        def one(i: int) -> None:
            body, headers = infer_body(images(8, seed=40 + i), binary=True)
            start.wait()
            codes.append(httpx.post(s.url + "/infer", content=body, headers={**headers, **AUTH},
                                    timeout=60).status_code)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        charged = used(s, KEY)
    assert sorted(codes) == [200, 200] + [402] * 6
    assert backend.computed == charged == 16


def test_a_model_failure_refunds_the_reservation(model):
    backend = CountingBackend(model)
    with ThreadServer(backend, api_keys={KEY: 10}) as s, httpx.Client(base_url=s.root, headers=AUTH) as c:
        body, headers = infer_body(images(6, seed=50), binary=True, request_id="fails-once")
        backend.fail = True
        r = c.post("/v2/models/teacher/infer", content=body, headers=headers)
        assert r.status_code == 500 and used(s, KEY) == 0
        assert metric(c, "b2kd_refunded_queries_total") == 6
        backend.fail = False  # the same request again: charged once, answered
        assert c.post("/v2/models/teacher/infer", content=body, headers=headers).status_code == 200
        assert used(s, KEY) == 6


def test_replay_records_are_capped_per_key_while_the_server_runs(model):
    with ThreadServer(model, api_keys={KEY: None}, replay_per_key=2) as s, \
            httpx.Client(base_url=s.root, headers=AUTH) as c:
        sent = [infer_body(images(1, seed=60 + i), binary=True, request_id=f"r{i}") for i in range(3)]
        for body, headers in sent:
            assert c.post("/v2/models/teacher/infer", content=body, headers=headers).status_code == 200
        assert s.app.state.store.records() == 2 and used(s, KEY) == 3
        for body, headers in sent[1:]:  # still replayed for free
            assert c.post("/v2/models/teacher/infer", content=body, headers=headers).status_code == 200
        assert used(s, KEY) == 3
        body, headers = sent[0]  # its record was dropped: answered, and charged, again
        assert c.post("/v2/models/teacher/infer", content=body, headers=headers).status_code == 200
        assert used(s, KEY) == 4 and s.app.state.store.records() == 2


def test_an_unwritable_access_log_never_fails_a_request(model, tmp_path):
    """Before: the log file replaced by a directory turned a charged answer into a 500."""
    log = tmp_path / "access.log"
    with ThreadServer(model, api_keys={KEY: None}, access_log=log) as s, \
            httpx.Client(base_url=s.root, headers=AUTH) as c:
        body, headers = infer_body(images(2, seed=70), binary=True)
        assert c.post("/v2/models/teacher/infer", content=body, headers=headers).status_code == 200
        assert wait_for_log(log, lambda r: r["status"] == 200)
        log.unlink()
        log.mkdir()
        for _ in range(3):
            assert c.post("/v2/models/teacher/infer", content=body, headers=headers).status_code == 200
        assert used(s, KEY) == 8
        deadline = time.monotonic() + 30
        while metric(c, "b2kd_access_log_failures_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric(c, "b2kd_access_log_failures_total") >= 1
        log.rmdir()  # the writer goes on once the path is writable again
        assert c.post("/v2/models/teacher/infer", content=body, headers=headers).status_code == 200
        assert wait_for_log(log, lambda r: r.get("queries") == 2)


def test_metrics_and_statistics_can_need_a_key(model):
    with ThreadServer(model, metrics_key="mk-secret") as s:
        for path in ("/metrics", "/v2/models/teacher/stats", "/v2/models/stats"):
            assert httpx.get(s.root + path).status_code == 401
            assert httpx.get(s.root + path, headers={"Authorization": "Bearer nope"}).status_code == 401
            r = httpx.get(s.root + path, headers={"Authorization": "Bearer mk-secret"})
            assert r.status_code == 200, path
        assert httpx.get(s.url).status_code == 200  # metadata stays open


def test_failed_authentication_is_rate_limited_per_address(model):
    # one failure regained per 100 s: a slow machine cannot refill the bucket during the test
    with ThreadServer(model, api_keys={KEY: None}, auth_failures=3, auth_failure_rate=0.01) as s:
        body, headers = infer_body(images(1), binary=True)
        wrong = [httpx.post(s.url + "/infer", content=body, headers={**headers, "Authorization": "Bearer x"})
                 for _ in range(4)]
        assert [r.status_code for r in wrong] == [401, 401, 401, 429]
        assert int(wrong[-1].headers["retry-after"]) >= 50 and "failed authentications" in wrong[-1].text
        # while the address is blocked even a right key waits: guessing costs time
        r = httpx.post(s.url + "/infer", content=body, headers={**headers, **AUTH})
        assert r.status_code == 429


def test_key_ids_are_keyed_hashes_never_the_plain_sha256(model, tmp_path):
    import hashlib
    import sqlite3

    plain = "k-" + hashlib.sha256(KEY.encode()).hexdigest()[:16]
    with ThreadServer(model, api_keys={KEY: 5}, state=tmp_path / "a.sqlite", secret=b"s" * 32) as a, \
            ThreadServer(model, api_keys={KEY: 5}, state=tmp_path / "b.sqlite", secret=b"t" * 32) as b:
        assert a.app.state.key_id(KEY) != b.app.state.key_id(KEY)
        assert plain not in {a.app.state.key_id(KEY), b.app.state.key_id(KEY)}
        text = httpx.get(a.root + "/metrics").text
        assert a.app.state.key_id(KEY) in text and plain not in text
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        assert [r[0] for r in db.execute("SELECT key_id FROM keys")] == [a.app.state.key_id(KEY)]


def test_idle_and_half_open_connections_are_cut_off_and_connections_are_limited(model, tmp_path):
    """Before: a connection that sent nothing, half a head or half a body was held for ever; and
    the 503s of the connection limit reached neither /metrics nor the access log."""
    infer = "/v2/models/teacher/infer"
    body, headers = infer_body(images(2, seed=80), binary=True)
    head = raw_head(infer, {**headers, **AUTH}, len(body))
    log = tmp_path / "access.log"
    with ThreadServer(model, api_keys={KEY: None}, read_timeout_s=1.5, max_connections=4,
                      max_connections_per_address=4, access_log=log) as s:
        cases = {"no bytes": b"", "half a head": head[:40], "half a body": head + body[:100]}
        socks = {what: socket.create_connection(("127.0.0.1", s.port), timeout=20) for what in cases}
        for what, data in cases.items():
            socks[what].sendall(data)
        ready = raw_head("/v2/health/ready", {}, method="GET")
        deadline = time.monotonic() + 10  # once the server has accepted all three, a fourth is refused
        while raw_request(s.port, ready) != 503:
            assert time.monotonic() < deadline, "the connection limit (4) was never reached"
            time.sleep(0.01)
        assert raw_request(s.port, head + body) == 503
        got = {what: read_status(sock) for what, sock in socks.items()}  # TimeoutError if held
        for sock in socks.values():
            sock.close()
        assert got == {"no bytes": None, "half a head": None, "half a body": 408}
        assert raw_request(s.port, head + body) == 200  # served again once they are gone
        assert used(s, KEY) == 2
        with httpx.Client(base_url=s.root) as c:
            refused = metric(c, 'b2kd_refusals_total{reason="connections"}')
            assert refused >= 2  # the health checks that met the limit, and the inference request
            assert metric(c, 'b2kd_http_requests_total{endpoint="unmatched",status="503"}') == refused
        logged = wait_for_log(log, lambda r: r["status"] == 503 and r["path"] == infer)
        assert len(logged) == 1 and "limit of 4 connections" in logged[0]["error"]
        assert len(wait_for_log(log, lambda r: r["status"] == 503)) == refused


def test_one_address_cannot_hold_every_connection(model, tmp_path):
    """Before: 1,005 idle sockets from one address made every request (health checks too) a 503
    until they timed out, and none of those 503s showed in /metrics or the access log. Now one
    address holds at most a quarter of max_connections; beyond that, a 503 at once, counted."""
    log = tmp_path / "access.log"
    flood, allowed = 120, 25
    with ThreadServer(model, api_keys={KEY: None}, read_timeout_s=30, max_connections=100,
                      access_log=log) as s:
        start = time.monotonic()
        socks = [socket.create_connection(("127.0.0.1", s.port), timeout=10, source_address=("127.0.0.2", 0))
                 for _ in range(flood)]
        try:
            statuses = [read_status(sock) if i >= allowed else None for i, sock in enumerate(socks)]
            assert statuses[allowed:] == [503] * (flood - allowed)  # answered at once, not after 30 s
            body, headers = infer_body(images(1, seed=81), binary=True)
            with httpx.Client(base_url=s.root, timeout=10) as c:  # another address is served
                assert c.get("/v2/health/ready").status_code == 200
                assert c.post("/v2/models/teacher/infer", content=body,
                              headers={**headers, **AUTH}).status_code == 200
                assert metric(c, 'b2kd_refusals_total{reason="connections_per_address"}') == flood - allowed
                assert metric(c, 'b2kd_http_requests_total{endpoint="unmatched",status="503"}') == flood - allowed
            assert time.monotonic() - start < 20
        finally:
            for sock in socks:
                sock.close()
        records = wait_for_log(log, lambda r: r["status"] == 503 and r["client"] == "127.0.0.2")
        deadline = time.monotonic() + 10
        while len(records) < flood - allowed and time.monotonic() < deadline:
            records = wait_for_log(log, lambda r: r["status"] == 503 and r["client"] == "127.0.0.2")
        assert len(records) == flood - allowed
        assert "holds 25 connections" in records[0]["error"]


def test_serve_max_connections_per_address_sets_the_per_address_limit_of_b2kd_serve(model, tmp_path):
    """serve.max_connections_per_address reaches `b2kd serve`: with 2, an address's third
    connection is a 503 at once, counted in /metrics and the access log (default: a quarter of
    max_connections, 250, so three connections were all held)."""
    from b2kd.core.checkpoint import save_classifier
    from b2kd.provider.serve import ServedTeacher

    save_classifier(model, tmp_path / "teacher.pt", dataset="npz", image_size=28)
    with ServedTeacher(tmp_path / "teacher.pt", tmp_path / "server",
                       overrides=("serve.max_connections_per_address=2",)) as server:
        socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                          source_address=("127.0.0.2", 0)) for _ in range(3)]
        try:
            assert read_status(socks[2]) == 503  # answered at once, not after the head timeout
            with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as c:
                assert c.get("/v2/health/ready").status_code == 200  # another address is served
                assert metric(c, 'b2kd_refusals_total{reason="connections_per_address"}') == 1
                assert metric(c, 'b2kd_http_requests_total{endpoint="unmatched",status="503"}') == 1
        finally:
            for sock in socks:
                sock.close()
        records = wait_for_log(tmp_path / "server" / "access.log",
                               lambda r: r["status"] == 503 and r["client"] == "127.0.0.2")
        assert len(records) == 1 and "holds 2 connections" in records[0]["error"]
