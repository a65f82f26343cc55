"""The client against a hostile server (tests/hostile.py): every wait bounded, every bad answer refused.

Each case makes ``b2kd distill`` exit non-zero with one ``error:`` line and
leaves no invalid row in the ledger. Waits are made short by config
(``teacher.backoff_s=0.05``, ``max_wait_s=0.2``, ``max_total_wait_s=2``), so
each run ends within about two seconds of waiting; the number of requests the
server received is the bound that is checked (no timing asserts).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hostile import METADATA, Hostile, answer, refuse, request_of, uniform
from test_cli import assert_user_error, invoke, ledger_rows
from toy import make_toy, toy_model

from b2kd.blackbox import BlackBoxError, TeacherRefused, TeacherUnavailable
from b2kd.blackbox.validate import InvalidAnswer
from b2kd.edge import BlackBoxTeacher, Ledger
from b2kd.edge.client import HTTPTeacher

FAST = {"backoff": 0.05, "max_wait": 0.2, "max_total_wait": 2.0, "retries": 2}
FAST_CONFIG = ["teacher.backoff_s=0.05", "teacher.max_wait_s=0.2", "teacher.max_total_wait_s=2",
               "teacher.retries=2"]
# waits of 0.05, 0.1, then 0.2 each (jitter and a slow machine only lengthen them) fill 2 s after
# at most 11: at most 12 attempts before the client gives up, however fast the server refuses
MOST_ATTEMPTS = 12


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("hostile-toy"), toy_model())


def images(n: int, seed: int = 0) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=rng)


def scores(fill):
    """An inference handler answering ``fill(n)`` as the (n, 10) FP32 output, in binary."""
    def infer(body, headers):
        request_id, x = request_of(body, headers)
        return answer(request_id, fill(len(x)))
    return infer


def logits(n: int) -> np.ndarray:
    return np.random.default_rng(n).normal(0, 3, (n, 10)).astype(np.float32)


def with_nan(n: int) -> np.ndarray:
    out = uniform(n)
    out[n // 2, 3] = np.nan
    return out


def with_inf(n: int) -> np.ndarray:
    out = uniform(n)
    out[0, 0] = np.inf
    return out


def datatype_list(body, headers):
    request_id, x = request_of(body, headers)
    entry = {"name": "scores", "datatype": ["FP32"], "shape": [len(x), 10], "data": [0.1] * (10 * len(x))}
    body = json.dumps({"id": request_id, "outputs": [entry]}).encode()
    return 200, {"Content-Type": "application/json"}, body


# (server behaviour, what the one error line says, fewest and most inference requests it may take)
CASES = {
    "429 Retry-After 0": (lambda b, h: refuse(429, "0"), "did not answer within teacher.max_total_wait_s", 1,
                          MOST_ATTEMPTS),
    "429 Retry-After -5": (lambda b, h: refuse(429, "-5"), "did not answer within", 1, MOST_ATTEMPTS),
    "429 Retry-After nan": (lambda b, h: refuse(429, "nan"), "did not answer within", 1, MOST_ATTEMPTS),
    "503 Retry-After 100000": (lambda b, h: refuse(503, "100000"), "asks to wait 100000 s", 1, 1),
    "503 Retry-After inf": (lambda b, h: refuse(503, "inf"), "failed 3 times in a row", 3, 3),
    # the binary request, then its one JSON try (a server may not implement binary tensors)
    "501 not implemented": (lambda b, h: refuse(501, error="Model versioning not supported yet."),
                            "HTTP 501", 2, 2),
    "NaN": (scores(with_nan), "NaN is not a probability", 1, 1),
    "inf": (scores(with_inf), "infinite values", 1, 1),
    "logits as probabilities": (scores(logits), "teacher.output=logits", 1, 1),
    "datatype ['FP32']": (datatype_list, "sent a malformed answer", 1, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_server_ends_the_client_with_one_clear_error(case):
    infer, needle, fewest, most = CASES[case]
    with Hostile(infer) as server, pytest.raises(BlackBoxError, match=needle.replace("(", r"\(")):
        with HTTPTeacher(server.url, **FAST) as backend:
            backend.infer(images(4))
    assert fewest <= server.infers <= most


@pytest.mark.parametrize("case", list(CASES))
def test_distill_against_a_hostile_server_fails_clearly_and_records_nothing(toy, tmp_path, case):
    infer, needle, fewest, most = CASES[case]
    with Hostile(infer) as server:
        result = invoke("distill", "--config", toy / "toy.yaml", "--teacher-url", server.url,
                        "--generator", toy / "generator.pt", "--out", tmp_path / "run", *FAST_CONFIG)
    assert_user_error(result, needle)
    assert fewest <= server.infers <= most
    assert ledger_rows(tmp_path / "run" / "ledger.sqlite") == []
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("header", ["0", "-5", "nan", "soon"])
def test_a_rate_limit_without_a_usable_wait_is_retried_after_the_backoff(header):
    calls = []

    def infer(body, headers):
        calls.append(1)
        if len(calls) <= 2:
            return refuse(429, header)
        request_id, x = request_of(body, headers)
        return answer(request_id, uniform(len(x)))

    with Hostile(infer) as server, HTTPTeacher(server.url, backoff=0.01, max_total_wait=60) as backend:
        assert backend.infer(images(3)).responses.shape == (3, 10)
    assert server.infers == 3


def test_answers_paid_before_an_invalid_one_are_kept_and_only_they(tmp_path):
    """The server takes 16 images a request; its third answer holds NaN: 32 valid rows stay."""
    calls = []

    def infer(body, headers):
        request_id, x = request_of(body, headers)
        calls.append(len(x))
        return answer(request_id, with_nan(len(x)) if len(calls) == 3 else uniform(len(x)))

    meta = {**METADATA, "parameters": {"max_batch_size": 16}}
    with Hostile(infer, meta) as server, HTTPTeacher(server.url, **FAST) as backend:
        teacher = BlackBoxTeacher(backend, Ledger(tmp_path / "ledger.sqlite"))
        with pytest.raises(InvalidAnswer, match="row 8 is .*NaN is not a probability"):
            teacher.query(images(64))
    assert calls == [16, 16, 16]
    assert teacher.ledger.count() == 32 and teacher.ledger.invalid_ids() == []


def test_logits_stated_are_turned_into_probabilities_and_probabilities_are_refused_as_logits():
    with Hostile(scores(logits)) as server, HTTPTeacher(server.url, output="logits") as backend:
        got = backend.infer(images(5)).responses
    torch.testing.assert_close(got, torch.softmax(torch.from_numpy(logits(5)), dim=1), rtol=0, atol=0)
    assert torch.allclose(got.sum(1), torch.ones(5))
    with Hostile(scores(uniform)) as server, HTTPTeacher(server.url, output="logits") as backend:
        with pytest.raises(InvalidAnswer, match="sent probabilities .* but teacher.output is 'logits'"):
            backend.infer(images(5))
    nan_logits = scores(lambda n: np.where(np.eye(n, 10) > 0, np.nan, logits(n)))
    with Hostile(nan_logits) as server, HTTPTeacher(server.url, output="logits") as backend:
        with pytest.raises(InvalidAnswer, match="invalid logits: row 0"):
            backend.infer(images(5))


def test_a_json_answer_with_null_parameters_is_accepted():
    """kserve's JSON answers say ``"parameters": null`` for the message and each output."""
    probs = np.array([[0.5, 0.25] + [0.03125] * 8], dtype=np.float32)

    def infer(body, headers):
        request_id, x = request_of(body, headers)
        return answer(request_id, np.repeat(probs, len(x), axis=0), binary=False)

    with Hostile(infer) as server, HTTPTeacher(server.url, binary=False) as backend:
        got = backend.infer(images(3)).responses
    assert torch.equal(got, torch.from_numpy(probs).repeat(3, 1))


@pytest.mark.parametrize(("config", "batches"), [({"max_batch_size": 8}, [8, 8, 4]), (None, [20])],
                         ids=["config-says-8", "no-config-404"])
def test_the_largest_batch_is_read_from_the_model_config_when_the_server_has_one(config, batches):
    """Triton states max_batch_size in /v2/models/NAME/config, not in the metadata."""
    sizes = []

    def infer(body, headers):
        request_id, x = request_of(body, headers)
        sizes.append(len(x))
        return answer(request_id, uniform(len(x)))

    with Hostile(infer, config=config) as server, HTTPTeacher(server.url) as backend:
        backend.infer(images(20))
    assert sizes == batches
    assert server.requests["/v2/models/teacher/config"] == 1


def test_a_fixed_batch_dimension_is_filled_and_only_real_images_are_answered():
    sizes, answered = [], []

    def infer(body, headers):
        request_id, x = request_of(body, headers)
        sizes.append(len(x))
        answered.append(x[:, 0, 0, 0].copy())
        out = np.zeros((len(x), 10), dtype=np.float32)
        out[np.arange(len(x)), x[:, 0, 0, 0] % 10] = 1.0  # the class is the first pixel mod 10
        return answer(request_id, out)

    meta = {**METADATA, "inputs": [{"name": "images", "datatype": "UINT8", "shape": [4, 1, 28, 28]}]}
    x = images(6, seed=3)
    with Hostile(infer, meta) as server, HTTPTeacher(server.url) as backend:
        got = backend.infer(x)
    assert sizes == [4, 4] and backend.batch_size == 4
    assert answered[1].tolist() == [int(x[4, 0, 0, 0]), int(x[5, 0, 0, 0])] + [int(x[4, 0, 0, 0])] * 2
    assert got.responses.argmax(1).tolist() == (x[:, 0, 0, 0].long() % 10).tolist()
    assert len(got.bytes_sent) == 6


@pytest.mark.parametrize(("header", "expected"), [("2", 2.0), ("-5", 0.0), ("0", 0.0), ("nan", None),
                                                  ("inf", None), ("-inf", None), ("1e400", None)])
def test_only_finite_retry_after_values_are_taken(header, expected):
    import httpx

    from b2kd.edge.client import retry_after

    assert retry_after(httpx.Response(429, headers={"Retry-After": header})) == expected


def test_waits_grow_from_the_backoff_when_the_server_asks_for_none_and_are_capped():
    with Hostile(scores(uniform)) as server, HTTPTeacher(server.url, **FAST) as backend:
        # no usable Retry-After (None, or 0 < backoff): exponential from 0.05 (+ up to 10% jitter),
        # capped at max_wait 0.2
        for asked, attempt, low, high in ((None, 1, 0.05, 0.055), (0.0, 2, 0.1, 0.11), (None, 3, 0.2, 0.2),
                                          (None, 40, 0.2, 0.2)):
            assert low <= backend._wait(asked, attempt) <= high
        assert backend._wait(0.15, 1) == 0.15  # what the server asked, when at least the backoff
        assert backend._wait(30.0, 1) == 0.2  # never more than max_wait


def test_a_501_is_not_retried_even_with_retries_to_spare():
    with Hostile(lambda b, h: refuse(501, error="Model versioning not supported yet.")) as server:
        with pytest.raises(TeacherRefused, match="HTTP 501.*versioning"):
            with HTTPTeacher(server.url, retries=50, backoff=5.0, binary=False) as backend:
                backend.infer(images(2))
    assert server.infers == 1


def test_waiting_longer_than_the_total_is_refused_at_once_with_the_figure():
    with Hostile(lambda b, h: refuse(429, "30")) as server:
        with pytest.raises(TeacherUnavailable, match=r"asks to wait 30 s \(Retry-After\), more than"
                                                     r" teacher.max_total_wait_s = 10 s"):
            with HTTPTeacher(server.url, max_total_wait=10) as backend:
                backend.infer(images(2))
    assert server.infers == 1


@pytest.mark.parametrize(("url", "key", "warned"), [
    ("http://10.0.0.5:8000", "k", True), ("http://teacher.example.com", "k", True),
    ("https://teacher.example.com", "k", False), ("http://127.0.0.1:8000", "k", False),
    ("http://localhost:8000", "k", False), ("http://[::1]:8000", "k", False),
    ("http://10.0.0.5:8000", None, False),
])
def test_a_key_sent_over_plain_http_to_another_host_is_warned_about(url, key, warned):
    from b2kd.edge.client import key_exposure

    message = key_exposure(url, key)
    assert (message is not None) == warned
    if warned:
        assert "over plain http://" in message and "https://" in message


def test_no_warning_for_a_key_to_this_machine(caplog):
    with Hostile(scores(uniform)) as server, HTTPTeacher(server.url, "k"):
        pass
    assert not [r for r in caplog.records if "plain http" in r.getMessage()]
