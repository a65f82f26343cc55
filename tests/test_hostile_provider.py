"""The edge against a hostile provider: every wait bounded end to end, every bad answer refused and counted.

Fake v2 servers on 127.0.0.1 (the standard library's HTTP server, answers
written byte by byte) rate-limit forever, hang, drip, send too much, send HTML,
invalid rows, wrong shapes, truncated binary, answers to other requests. Each
case ends the client with one line of a b2kd error within a measured wall time
(small bounds set here: an attempt 0.5 s, a request 1.5 s), and the ledger
holds no invalid answer; answers that arrived and were refused are counted.
The default bounds are checked from the config, not by waiting.
"""

from __future__ import annotations

import inspect
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import numpy as np
import pytest
from hostile import METADATA, answer, refuse, request_of, uniform
from served import ThreadServer, images, toy_model
from test_cli import assert_ok, assert_user_error, invoke, ledger_rows
from toy import make_toy

from b2kd.blackbox import BlackBoxError, QuotaExceeded, TeacherUnavailable
from b2kd.blackbox.protocol import HEADER_LENGTH
from b2kd.blackbox.validate import InvalidAnswer
from b2kd.core.config import TeacherConfig
from b2kd.edge import BlackBoxTeacher, Ledger, image_hashes
from b2kd.edge.client import HTTPTeacher, longest_wait_s
from b2kd.edge.teacher import MixedProviders

TIMEOUT, TOTAL = 0.5, 1.5
FAST = {"timeout": TIMEOUT, "max_total_wait": TOTAL, "backoff": 0.05, "max_wait": 0.2, "retries": 2}
FAST_CONFIG = [f"teacher.timeout_s={TIMEOUT}", f"teacher.max_total_wait_s={TOTAL}", "teacher.backoff_s=0.05",
               "teacher.max_wait_s=0.2", "teacher.retries=2"]
#: A loaded 2-core machine may start a thread late; no case here is near this past its bound.
SLACK = 3.0


class Scripted:
    """``with Scripted(act) as s: s.url``: honest metadata; ``act(handler, body)`` writes each
    inference answer to ``handler.wfile`` as it likes, when it likes (until ``s.stop`` is set)."""

    def __init__(self, act: Callable[[BaseHTTPRequestHandler, bytes], None], metadata: dict | None = None):
        self.stop, self.infers = threading.Event(), 0
        outer, meta = self, json.dumps(metadata or METADATA).encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            scripted = outer  # what a slow act watches: it ends when the test does

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                found = not self.path.endswith("/config")
                body = meta if found else b'{"error": "Not Found"}'
                write(self, 200 if found else 404, {"Content-Type": "application/json"}, body)

            def do_POST(self) -> None:
                outer.infers += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    act(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up on this answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v2/models/teacher"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._server.shutdown()
        self._server.server_close()


def write(handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
    handler.send_response(status)
    for name, value in {**headers, "Content-Length": str(len(body))}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def replying(infer: Callable[[bytes, Any], tuple[int, dict[str, str], bytes]]):
    """An act writing what a tests/hostile.py handler returns."""
    return lambda handler, body: write(handler, *infer(body, handler.headers))


def rows(fill: Callable[[int], np.ndarray]):
    """An act answering ``fill(n)`` as the (n, 10) FP32 output, in binary, with the request's id."""
    def infer(body, headers):
        request_id, x = request_of(body, headers)
        return answer(request_id, fill(len(x)))
    return replying(infer)


# --- what the servers do --------------------------------------------------------------------------


def hang(handler, body) -> None:
    handler.scripted.stop.wait(60)


def dripping(handler, byte: bytes) -> None:
    """``byte`` every 0.1 s until the test ends (100000 of them would take about 3 hours)."""
    while not handler.scripted.stop.wait(0.1):
        handler.wfile.write(byte)
        handler.wfile.flush()


def drip_body(handler, body) -> None:
    """A 200 promising 100 kB, sent a byte every 0.1 s (about 3 hours in all)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", "100000")
    handler.end_headers()
    dripping(handler, b" ")


def drip_head(handler, body) -> None:
    """The status line, then header bytes a byte every 0.1 s: the head never ends."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Pad: ")
    dripping(handler, b"a")


def huge_declared(handler, body) -> None:
    """A 200 declaring 10 GB, then sending zeros."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(10 * 2**30))
    handler.end_headers()
    for _ in range(1000):
        handler.wfile.write(bytes(65536))


def huge_chunked(handler, body) -> None:
    """A 200 with no length, 64 kB chunks of zeros without end (up to 64 MB)."""
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    chunk = b"10000\r\n" + bytes(65536) + b"\r\n"
    for _ in range(1000):
        handler.wfile.write(chunk)


HTML = b"<!DOCTYPE html>\n<html>\n<body>\n<h1>502 Bad Gateway</h1>\n\x1b[31mnginx\x1b[0m\n</body>\n</html>\n"


def html(status: int):
    return lambda handler, body: write(handler, status, {"Content-Type": "text/html"}, HTML)


def truncated(handler, body) -> None:
    """A valid binary answer cut short (its header still declares every byte)."""
    request_id, x = request_of(body, handler.headers)
    status, headers, full = answer(request_id, uniform(len(x)))
    write(handler, status, headers, full[: len(full) - 7])


def with_value(row: int, col: int, value: float):
    def fill(n: int) -> np.ndarray:
        out = uniform(n)
        out[row, col] = value
        return out
    return fill


def negative(n: int) -> np.ndarray:
    out = uniform(n)
    out[0, 0], out[0, 1] = -0.1, 0.3  # still sums to 1
    return out


def logits(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(0, 3, (n, 10)).astype(np.float32)


# attempts of 0.5 s and waits: the third failure (teacher.retries = 2) or the 1.5 s, whichever comes first
CUT = (r"(did not answer within teacher.max_total_wait_s = 1.5 s|failed 3 times in a row).* last: no complete"
       r" answer within \d\.\d+ s \(an attempt ends after teacher.timeout_s = 0.5 s\)")
# (what the server does, what the one error line says (a regex), whether an answer arrived)
HOSTILE = {
    "429 forever": (replying(lambda b, h: refuse(429)), "did not answer within teacher.max_total_wait_s = 1.5 s:"
                    r" gave up after [\d.]+ s and \d+ attempts \(each at most teacher.timeout_s = 0.5 s\)", False),
    "429 Retry-After 0": (replying(lambda b, h: refuse(429, "0")), "did not answer within", False),
    "429 Retry-After nan": (replying(lambda b, h: refuse(429, "nan")), "did not answer within", False),
    "429 Retry-After -5": (replying(lambda b, h: refuse(429, "-5")), "did not answer within", False),
    "429 Retry-After 100000": (replying(lambda b, h: refuse(429, "100000")), r"asks to wait 100000 s"
                               r" \(Retry-After\), more than teacher.max_total_wait_s = 1.5 s", False),
    "503 Retry-After 0": (replying(lambda b, h: refuse(503, "0")), r"failed 3 times in a row \(teacher.retries"
                          " = 2\\); last: HTTP 503", False),
    "hang": (hang, CUT, False),
    "drip body": (drip_body, CUT, False),
    "drip head": (drip_head, CUT, False),
    "10 GB declared": (huge_declared, r"sent an answer of more than \d+(\.\d+)? MB", True),
    "endless chunks": (huge_chunked, r"sent an answer of more than \d+(\.\d+)? MB", True),
    "HTML 200": (html(200), r"sent a malformed answer \(a text/html body\): the .* is not valid JSON", True),
    "HTML 502": (html(502), "failed 3 times in a row .* HTTP 502 \\(<!DOCTYPE html> <html> <body>", False),
    "NaN row": (rows(with_value(1, 3, np.nan)), "NaN is not a probability", True),
    "inf row": (rows(with_value(0, 0, np.inf)), "infinite", True),
    "negative row": (rows(negative), "row 0", True),
    "logits as probabilities": (rows(logits), "teacher.output=logits", True),
    "a row too many": (rows(lambda n: uniform(n + 1)), "sent a malformed answer", True),
    "9 classes": (rows(lambda n: uniform(n)[:, :9]), "sent a malformed answer", True),
    "truncated binary": (truncated, "sent a malformed answer", True),
}


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "\x1b" not in text and len(text) < 700, text
    return text


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_provider_ends_the_query_in_one_line_within_the_bounds(case, tmp_path):
    act, needle, arrived = HOSTILE[case]
    with Scripted(act) as server:
        with HTTPTeacher(server.url, **FAST) as backend, Ledger(tmp_path / "ledger.sqlite") as ledger:
            teacher = BlackBoxTeacher(backend, ledger)
            start = time.monotonic()
            with pytest.raises(BlackBoxError) as caught:
                teacher.query(images(4))
            elapsed = time.monotonic() - start
            totals, invalid = ledger.totals(), ledger.invalid_ids()
    print(f"{case}: {elapsed:.2f} s, {server.infers} requests")
    assert re.search(needle, one_line(caught.value)), caught.value
    assert elapsed <= TOTAL + SLACK
    assert totals["queries"] == 0 and invalid == []
    assert totals["refused_answers"] == (4 if arrived else 0)
    assert (totals["refused_bytes"] > 0) == (arrived and case != "10 GB declared")  # refused unread


def test_the_default_bounds_give_up_on_a_silent_provider_within_150_s():
    """Computed from the settings, not waited for: the model config's probe, then one request's
    bound (which every attempt, Retry-After, backoff and read is cut to)."""
    defaults = TeacherConfig()
    assert longest_wait_s(defaults) <= 150
    assert defaults.timeout_s <= defaults.max_total_wait_s <= 120
    signature = inspect.signature(HTTPTeacher).parameters
    assert signature["max_total_wait"].default == defaults.max_total_wait_s
    assert signature["timeout"].default == defaults.timeout_s


def test_a_drip_after_a_valid_start_is_cut_at_the_attempt_bound():
    """One attempt's bound is the whole attempt's: 0.5 s, however regularly the bytes come."""
    with Scripted(drip_body) as server, HTTPTeacher(server.url, **{**FAST, "retries": 0}) as backend:
        start = time.monotonic()
        with pytest.raises(TeacherUnavailable, match="no complete answer within 0.5 s"):
            backend.infer(images(2))
        assert time.monotonic() - start <= TIMEOUT + SLACK


def test_valid_then_invalid_keeps_the_valid_answers_and_counts_the_refused(tmp_path):
    calls = []

    def infer(body, headers):
        request_id, x = request_of(body, headers)
        calls.append(len(x))
        return answer(request_id, with_value(2, 1, np.nan)(len(x)) if len(calls) == 2 else uniform(len(x)))

    meta = {**METADATA, "parameters": {"max_batch_size": 8}}
    with Scripted(replying(infer), meta) as server, HTTPTeacher(server.url, **FAST) as backend:
        teacher = BlackBoxTeacher(backend, Ledger(tmp_path / "ledger.sqlite"))
        with pytest.raises(InvalidAnswer, match="row 2 is .*NaN"):
            teacher.query(images(24))
    totals = teacher.ledger.totals()
    assert calls == [8, 8] and totals["queries"] == 8 and teacher.ledger.invalid_ids() == []
    assert totals["refused_answers"] == 8 and 0 < totals["refused_bytes"] < 1000


def test_an_answer_to_an_earlier_request_is_refused_and_an_unknown_id_accepted_with_a_warning(tmp_path,
                                                                                            caplog):
    first: list[str] = []

    def replay_first(body, headers):  # every request answered as if it were the first
        request_id, x = request_of(body, headers)
        first.append(first[0] if first else request_id)
        return answer(first[0], uniform(len(x)))

    meta = {**METADATA, "parameters": {"max_batch_size": 4}}
    with Scripted(replying(replay_first), meta) as server, HTTPTeacher(server.url, **FAST) as backend:
        teacher = BlackBoxTeacher(backend, Ledger(tmp_path / "a.sqlite"))
        with pytest.raises(BlackBoxError, match="answer to request 'b2kd-.*it may be another request of"
                                                " this client's"):
            teacher.query(images(8))
    assert teacher.ledger.totals()["queries"] == 4 and teacher.ledger.totals()["refused_answers"] == 4

    def own_ids(body, headers):
        _, x = request_of(body, headers)
        return answer(f"server-{len(x)}", uniform(len(x)))

    with Scripted(replying(own_ids)) as server, HTTPTeacher(server.url, **FAST) as backend:
        got = backend.infer(images(3)).responses
        backend.infer(images(2, seed=1))
    assert got.shape == (3, 10)
    warned = [r.getMessage() for r in caplog.records if "ids it was not sent" in r.getMessage()]
    assert len(warned) == 1 and "'server-3'" in warned[0] and "accepted" in warned[0]  # once a client


def test_a_binary_request_refused_is_tried_as_json_and_the_run_goes_on_in_json(caplog):
    kinds = []

    def json_only(body, headers):
        binary = headers.get(HEADER_LENGTH) is not None
        kinds.append("binary" if binary else "json")
        if binary:
            return refuse(400, error="binary tensor extension not supported")
        request_id, x = request_of(body, headers)
        return answer(request_id, uniform(len(x)), binary=False)

    with Scripted(replying(json_only)) as server, HTTPTeacher(server.url, **FAST) as backend:
        first = backend.infer(images(3))
        backend.infer(images(2, seed=1))
        assert backend.binary is False
    assert kinds == ["binary", "json", "json"] and first.responses.shape == (3, 10)
    assert sum(first.bytes_sent) > 2 * 3 * 28 * 28  # the refused binary try is counted too
    warned = [r.getMessage() for r in caplog.records if "refused binary tensors" in r.getMessage()]
    assert len(warned) == 1 and "HTTP 400" in warned[0] and "teacher.binary=false" in warned[0]


def test_a_binary_request_answered_500_is_tried_once_as_json_at_once_not_retried(tmp_path):
    """Before: MLServer (no binary extension) answered HTTP 500 to binary requests, retried 6 times
    over ~35 s, ending in a truncated server traceback and no hint of teacher.binary=false."""
    kinds = []

    def json_only(body, headers):
        binary = headers.get(HEADER_LENGTH) is not None
        kinds.append("binary" if binary else "json")
        if binary:
            return 500, {"Content-Type": "application/json"}, b'{"error": "Traceback (most recent call last)'
        request_id, x = request_of(body, headers)
        return answer(request_id, uniform(len(x)), binary=False)

    with Scripted(replying(json_only)) as server, HTTPTeacher(server.url, **{**FAST, "backoff": 5.0}) as backend:
        teacher = BlackBoxTeacher(backend, Ledger(tmp_path / "ledger.sqlite"))
        start = time.monotonic()
        teacher.query(images(4))
        assert time.monotonic() - start < SLACK  # no backoff of 5 s: the JSON try comes at once
        assert backend.binary is False and teacher.ledger.count() == 4
    assert kinds == ["binary", "json"]


def test_a_refusal_json_does_not_change_ends_with_the_json_answer_and_binary_stays():
    with Scripted(replying(lambda b, h: refuse(400, error="bad input"))) as server:
        with HTTPTeacher(server.url, **FAST) as backend:
            with pytest.raises(BlackBoxError, match=r"refused the request \(HTTP 400\): bad input"):
                backend.infer(images(2))
            assert backend.binary is True
    assert server.infers == 2


# --- quota, providers ----------------------------------------------------------------------------


def test_a_keys_quota_is_spent_to_the_last_query(tmp_path):
    """Quota 50, requests of 16: the fourth is refused at 48 of 50 and shrinks to the 2 left."""
    with ThreadServer(toy_model(), "soft", api_keys={"k": 50}) as s:
        with HTTPTeacher(s.url, "k", batch_size=16, **FAST) as backend:
            teacher = BlackBoxTeacher(backend, Ledger(tmp_path / "ledger.sqlite"), batch_size=16)
            with pytest.raises(QuotaExceeded, match=r"48 of 50 .* \(the last 2 queries it allowed were paid"):
                teacher.query(images(64))
            assert teacher.ledger.count() == 50
            with pytest.raises(QuotaExceeded, match="50 of 50"):  # nothing left: nothing shrinks
                teacher.query(images(64))
        (used, quota), = s.app.state.store.usage().values()
    assert (used, quota) == (50, 50) and teacher.ledger.count() == 50


def test_a_quota_refusal_that_states_nothing_left_is_not_shrunk(tmp_path):
    refusal = replying(lambda b, h: refuse(402, error="quota exhausted"))
    with Scripted(refusal) as server, HTTPTeacher(server.url, **FAST) as backend:
        teacher = BlackBoxTeacher(backend, Ledger(tmp_path / "ledger.sqlite"))
        with pytest.raises(QuotaExceeded, match="quota exhausted$"):
            teacher.query(images(8))
    assert server.infers == 1 and teacher.ledger.count() == 0


def test_each_answer_names_its_provider_and_another_providers_ledger_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    # the first server stays up: a server started after it closed may get its port, and so its URL
    with Scripted(rows(uniform)) as first:
        with HTTPTeacher(first.url, **FAST) as backend:
            with Ledger(path) as ledger:
                BlackBoxTeacher(backend, ledger).query(images(4))
                (provider,) = ledger.providers()
        assert (provider.url, provider.model, provider.response) == (first.url, "teacher", "soft")
        with Scripted(rows(uniform)) as other, HTTPTeacher(other.url, **FAST) as backend:
            with Ledger(path) as ledger:
                assert ledger.other_providers(backend.provider) == [provider]
                with pytest.raises(MixedProviders) as caught:
                    BlackBoxTeacher(backend, ledger)
                assert "teacher.allow_mixed_providers=true" in one_line(caught.value)
                assert first.url in str(caught.value) and other.url in str(caught.value)
                BlackBoxTeacher(backend, ledger, allow_mixed_providers=True).query(images(4, seed=1))
                assert len(ledger.providers()) == 2 and ledger.count() == 8


OLD_SCHEMA = """
CREATE TABLE queries (id INTEGER PRIMARY KEY AUTOINCREMENT, hash TEXT NOT NULL, kind TEXT NOT NULL,
    bytes_sent INTEGER NOT NULL, bytes_received INTEGER NOT NULL, response BLOB NOT NULL, image BLOB,
    shape TEXT NOT NULL, stage TEXT NOT NULL, created REAL NOT NULL, UNIQUE (hash, kind));
"""


def test_an_old_ledger_migrates_its_answers_provider_unknown(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO queries (hash, kind, bytes_sent, bytes_received, response, shape, stage,"
                   " created) VALUES ('h', 'soft', 784, 40, ?, '1x28x28', 'distill', 0)",
                   (uniform(1)[0].tobytes(),))
    with Scripted(rows(uniform)) as server, HTTPTeacher(server.url, **FAST) as backend:
        with Ledger(path) as ledger:
            assert ledger.providers() == [] and ledger.other_providers(backend.provider) == []
            assert ledger.totals()["refused_answers"] == 0
            BlackBoxTeacher(backend, ledger).query(images(2))  # unknown is not another provider
            assert ledger.count() == 3 and ledger.providers() == [backend.provider]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT provider FROM queries ORDER BY id").fetchall() == [(None,), (1,), (1,)]


def test_the_shared_cache_records_each_answers_provider_and_refuses_another_providers(tmp_path):
    """Before: the shared ledger (teacher.shared_cache) kept no provider, so a run against another
    teacher was served the first teacher's answers from it, silently."""
    from b2kd.edge.cache import SharedCache

    shared = tmp_path / "shared.sqlite"
    with Scripted(rows(uniform)) as first:  # up throughout: the other server gets another port
        with HTTPTeacher(first.url, **FAST) as backend, Ledger(shared) as cache:
            BlackBoxTeacher(SharedCache(backend, cache), Ledger(tmp_path / "a.sqlite")).query(images(4))
            assert cache.providers() == [backend.provider]
        with Scripted(rows(uniform)) as other, HTTPTeacher(other.url, **FAST) as backend, Ledger(shared) as cache:
            with pytest.raises(MixedProviders) as caught:
                SharedCache(backend, cache)
            line = one_line(caught.value)
            assert "shared ledger (teacher.shared_cache)" in line and "teacher.allow_mixed_providers=true" in line
            assert first.url in line and other.url in line
            assert other.infers == 0  # refused before anything was sent
            mixed = BlackBoxTeacher(SharedCache(backend, cache, allow_mixed_providers=True),
                                    Ledger(tmp_path / "b.sqlite"), allow_mixed_providers=True)
            mixed.query(images(4, seed=1))
            assert len(cache.providers()) == 2 and cache.count() == 8


def test_a_run_whose_shared_cache_holds_another_providers_answers_is_refused_before_a_query(tmp_path):
    from b2kd.core.config import load_config
    from b2kd.edge.connect import open_teacher

    shared = tmp_path / "shared.sqlite"
    with Scripted(rows(uniform)) as first:  # up throughout: the other server gets another port
        with HTTPTeacher(first.url, **FAST) as backend, Ledger(shared) as cache:
            BlackBoxTeacher(backend, cache).query(images(2))
        with Scripted(rows(uniform)) as other:
            cfg = load_config(None, None, [f"teacher.url={other.url}", f"teacher.shared_cache={shared}", *FAST_CONFIG])
            with pytest.raises(MixedProviders, match=r"the shared ledger \(teacher.shared_cache\)"):
                open_teacher(cfg, tmp_path / "run", "soft", 10, "distill")
            assert other.infers == 0


def test_an_old_shared_cache_migrates_its_answers_provider_unknown(tmp_path):
    path = tmp_path / "old-shared.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SCHEMA)
        hashes = image_hashes(images(1))
        db.execute("INSERT INTO queries (hash, kind, bytes_sent, bytes_received, response, shape, stage,"
                   " created) VALUES (?, 'soft', 784, 40, ?, '1x28x28', 'shared', 0)",
                   (hashes[0], uniform(1)[0].tobytes()))
    from b2kd.edge.cache import SharedCache

    with Scripted(rows(uniform)) as server, HTTPTeacher(server.url, **FAST) as backend, Ledger(path) as cache:
        teacher = BlackBoxTeacher(SharedCache(backend, cache), Ledger(tmp_path / "run.sqlite"))
        teacher.query(images(3))  # the old answer is served; two new ones paid
        assert server.infers == 1 and cache.count() == 3 and teacher.ledger.count() == 3
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT provider FROM queries ORDER BY id").fetchall() == [(None,), (1,), (1,)]


# --- through the CLI -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("hostile-provider-toy"), toy_model())


def distill(toy, out, url, *extra):
    return invoke("distill", "--config", toy / "toy.yaml", "--teacher-url", url, "--generator",
                  toy / "generator.pt", "--out", out, *FAST_CONFIG, *extra)


def test_distill_against_a_hanging_provider_exits_in_one_line_within_the_bound(toy, tmp_path):
    with Scripted(hang) as server:
        start = time.monotonic()
        result = distill(toy, tmp_path / "run", server.url, "teacher.retries=20")  # the total ends it
        elapsed = time.monotonic() - start
    print(f"distill, hang: {elapsed:.2f} s")
    assert_user_error(result, "did not answer within teacher.max_total_wait_s = 1.5 s", "teacher.timeout_s = 0.5 s")
    assert elapsed <= TOTAL + 2 * SLACK  # the CLI loads the toy run too
    assert ledger_rows(tmp_path / "run" / "ledger.sqlite") == []


def test_a_missing_teacher_checkpoint_beside_a_url_is_one_line_before_any_query(toy, tmp_path):
    """Before: a --teacher kept only to evaluate against was looked for after the pool was paid
    and the student trained (600 queries paid, then 'checkpoint not found')."""
    with Scripted(rows(uniform)) as server:
        result = distill(toy, tmp_path / "run", server.url, "--teacher", tmp_path / "missing.pt")
    assert_user_error(result, "missing.pt")
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert server.infers == 0 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_distill_against_each_hostile_provider_exits_in_one_line_within_the_bound(toy, tmp_path, case):
    """Every case through `b2kd distill`: exit 2, one `error:` line, within the request's bound
    (plus loading the toy run), nothing invalid recorded; an answer that arrived and was refused is
    counted, and so the run's directory is kept (before: a refused first answer was undone with it)."""
    act, needle, arrived = HOSTILE[case]
    with Scripted(act) as server:
        start = time.monotonic()
        result = distill(toy, tmp_path / "run", server.url)
        elapsed = time.monotonic() - start
    print(f"distill, {case}: {elapsed:.2f} s, {server.infers} requests")
    assert result.exit_code == 2
    assert_user_error(result)
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert re.search(needle, line), line
    assert elapsed <= TOTAL + 2 * SLACK
    assert ledger_rows(tmp_path / "run" / "ledger.sqlite") == []
    if arrived:
        with Ledger(tmp_path / "run" / "ledger.sqlite") as ledger:
            assert ledger.invalid_ids() == [] and ledger.totals()["refused_answers"] > 0
    else:
        assert not (tmp_path / "run").exists()  # refused before any answer: nothing left behind


def test_distill_against_valid_then_invalid_answers_keeps_and_counts_them(toy, tmp_path):
    calls = []

    def infer(body, headers):
        request_id, x = request_of(body, headers)
        calls.append(len(x))
        return answer(request_id, negative(len(x)) if len(calls) == 3 else uniform(len(x)))

    meta = {**METADATA, "parameters": {"max_batch_size": 16}}
    with Scripted(replying(infer), meta) as server:
        result = distill(toy, tmp_path / "run", server.url)
    assert_user_error(result, "row 0")
    assert ledger_rows(tmp_path / "run" / "ledger.sqlite") == [("soft", "distill")] * 32
    with Ledger(tmp_path / "run" / "ledger.sqlite") as ledger:
        totals = ledger.totals()
        assert ledger.invalid_ids() == []
    assert totals["refused_answers"] == 16 and totals["refused_bytes"] > 0


def test_the_report_shows_the_answers_received_and_refused_beside_those_paid(toy, tmp_path):
    """Before: answers the provider computed (and bills) but b2kd refused were in no report."""
    calls = []

    def infer(body, headers):
        request_id, x = request_of(body, headers)
        calls.append(len(x))
        return answer(request_id, negative(len(x)) if len(calls) == 3 else uniform(len(x)))

    run = tmp_path / "run"
    with Scripted(replying(infer), {**METADATA, "parameters": {"max_batch_size": 16}}) as server:
        assert_user_error(distill(toy, run, server.url), "row 0")
        assert_ok(distill(toy, run, server.url))  # resumed: the rest is paid, valid this time
    report = (run / "report.md").read_text()
    assert "queries: 200 (budget 200)" in report and "received and refused 16 answers" in report
    assert '"refused_answers": 16' in (run / "report.json").read_text()


@pytest.mark.parametrize("local_copy", [False, True], ids=["url-only", "with-local-copy"])
def test_rerunning_an_out_against_another_provider_is_one_line_and_rewrites_nothing(toy, tmp_path, local_copy):
    """Before: the second server's run silently reused the first's answers and rewrote teacher.url
    in config.yaml. Without a local copy the run directory's check names the URL; with one (the URL
    is then not compared) the ledger's provider check refuses."""
    import hashlib

    run = tmp_path / "run"
    extra = ["--teacher", toy / "teacher.pt"] if local_copy else []
    # the first server stays up while the other runs: a server started after it closed may be given
    # the same port, and so the same URL, which no client can tell from the first provider
    with Scripted(rows(uniform)) as first:
        assert_ok(distill(toy, run, first.url, *extra))
        before = {name: hashlib.sha256((run / name).read_bytes()).hexdigest()
                  for name in ("config.yaml", "ledger.sqlite")}
        with Scripted(rows(uniform)) as other:
            assert other.url != first.url
            start = time.monotonic()
            result = distill(toy, run, other.url, *extra)
            assert time.monotonic() - start < 10 + SLACK
    needle = "holds answers from another provider" if local_copy else f"teacher.url: '{first.url}' -> '{other.url}'"
    assert_user_error(result, needle)
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
    assert other.infers == 0
    assert before == {name: hashlib.sha256((run / name).read_bytes()).hexdigest() for name in before}
    with Ledger(run / "ledger.sqlite") as ledger:
        assert [p.url for p in ledger.providers()] == [first.url] and ledger.invalid_ids() == []


FP32 = {**METADATA, "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]}


def test_later_commands_inherit_the_provider_settings_stored_with_the_generators_run(toy, tmp_path):
    """Before: teacher.url and teacher.input_preset had to be repeated on `b2kd distill` after
    `b2kd deprivatize` (else 'no teacher given', or an FP32 input refused for want of a preset)."""
    import yaml

    gan, run = tmp_path / "gan", tmp_path / "run"
    with Scripted(rows(uniform), FP32) as server:
        assert_ok(invoke("deprivatize", "--config", toy / "toy.yaml", "--teacher-url", server.url,
                         "--out", gan, "teacher.input_preset=unit", *FAST_CONFIG))
        args = ["distill", "--config", toy / "toy.yaml", "--generator", gan / "generator.pt", "--out", run]
        result = invoke(*args)
        assert_ok(result)
        inherited = [line for line in result.output.splitlines() if "inherited" in line]
        assert len(inherited) == 1, result.output
        assert f"teacher.url={server.url}" in inherited[0] and "teacher.input_preset=unit" in inherited[0]
        assert str(gan / "config.yaml") in inherited[0]
        stored = yaml.safe_load((run / "config.yaml").read_text())["teacher"]
        assert (stored["url"], stored["input_preset"]) == (server.url, "unit") and "api_key" not in stored
        with Ledger(run / "ledger.sqlite") as ledger:
            assert [p.url for p in ledger.providers()] == [server.url] and ledger.count() == 200
        assert_ok(invoke(*args))  # the same command again: the same settings, nothing to refuse
        # a setting given wins over the stored one (here refused: the run holds answers of 'unit')
        assert_user_error(invoke(*args, "teacher.input_preset=symmetric"),
                          "teacher.input_preset: 'unit' -> 'symmetric'")
        given = invoke(*args[:-1], tmp_path / "run2", "teacher.input_preset=symmetric")
        assert_ok(given)
        assert yaml.safe_load((tmp_path / "run2" / "config.yaml").read_text())["teacher"]["input_preset"] == "symmetric"
        assert "teacher.input_preset" not in next(line for line in given.output.splitlines() if "inherited" in line)
