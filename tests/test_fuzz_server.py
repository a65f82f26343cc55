"""Hundreds of malformed requests, written byte by byte, against a real server on 127.0.0.1.

Each request is wrong in one way: its bytes, its JSON, a field's type (a
datatype that is a list, a shape of strings...), its shape, its values, its
binary lengths, its key, its compression (bad, truncated or a bomb), its HTTP
framing, or its body (cut short and the connection half-closed, or left
half-open). Every one gets a 4xx or a closed connection within the read
timeout, never a 5xx and never a hang; nothing is charged; the server goes on
answering exactly.
"""

from __future__ import annotations

import gzip
import json
import socket
import zlib

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from served import ThreadServer, images, raw_head, read_status, toy_model

from b2kd.blackbox import LocalBackend
from b2kd.blackbox.protocol import HEADER_LENGTH, Tensor, encode

KEY = "sk-fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
INFER = "/v2/models/teacher/infer"
READ_TIMEOUT = 0.5  # the server's; a socket waits this plus a margin before the test fails
GOOD_HEADER = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 1, 28, 28],
                           "parameters": {"binary_data_size": 1568}}]}
junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4), max_leaves=12)
KINDS = ["bytes", "json", "field type", "datatype type", "shape", "dtype", "binary length", "huge",
         "no key", "wrong key", "nan", "values", "truncated", "header length", "model", "bad gzip",
         "gzip bomb", "encoding", "framing", "short body", "half-open"]


@pytest.fixture(scope="module")
def server():
    with ThreadServer(toy_model(), api_keys={KEY: None}, max_batch=64, read_timeout_s=READ_TIMEOUT,
                      max_body_bytes=60_000, auth_failures=10**6) as s:
        yield s


def good_body() -> tuple[bytes, bytes]:
    """(JSON header, binary pixels) of a well-formed request of 2 images."""
    text = json.dumps(GOOD_HEADER).encode()
    return text, np.random.default_rng(0).bytes(1568)


@st.composite
def hostile_requests(draw) -> tuple[str, bytes, str]:
    """(kind, the request's bytes on the wire, how to end: 'wait', 'half-close' or 'keep-open')."""
    what = draw(st.sampled_from(KINDS))
    path, headers = INFER, dict(AUTH)
    header = json.loads(json.dumps(GOOD_HEADER))
    entry = header["inputs"][0]
    text, pixels = good_body()
    body, end = None, "wait"
    if what == "bytes":
        body = draw(st.binary(max_size=2000))
        if draw(st.booleans()):
            headers[HEADER_LENGTH] = str(draw(st.integers(-10, 3000)))
    elif what == "json":  # well-formed JSON of the wrong structure
        body = json.dumps(draw(junk)).encode()
    elif what == "nan":
        prefix = b'{"inputs":[{"name":"images","datatype":"UINT8","shape":[1,1,28,28],"data":[NaN'
        body = prefix + b",0" * 783 + b"]}]}"
    elif what == "field type":  # any JSON in any field of the tensor or the request
        field = draw(st.sampled_from(["name", "shape", "parameters", "data", "id", "outputs", "inputs"]))
        (entry if field in ("name", "shape", "parameters", "data") else header)[field] = draw(junk)
        if field == "id" and (header["id"] is None or isinstance(header["id"], str)
                              and 0 < len(header["id"]) <= 256):
            header["id"] = ["not", "a", "string"]  # a valid id (or null: none) makes a valid request
        if field == "outputs" and header["outputs"] is None:
            header["outputs"] = [{"name": "nope"}]
        if field in ("name", "shape") and entry[field] in ("images", [2, 1, 28, 28]):
            entry[field] = None  # drawn valid by chance
    elif what == "datatype type":
        entry["datatype"] = draw(st.sampled_from([["UINT8"], {"UINT8": 1}, 8, None, True, 1.5, [[]]]))
    elif what == "shape":
        entry["shape"] = draw(st.lists(st.integers(-3, 40), max_size=6).filter(lambda s: s != [2, 1, 28, 28]))
    elif what == "dtype":
        entry["datatype"] = draw(st.sampled_from(["FP32", "INT64", "BYTES", "uint8", "", "BOOL", "FP16"]))
    elif what == "binary length":
        entry["parameters"]["binary_data_size"] = draw(junk.filter(lambda v: v != 1568))
    elif what == "huge":
        entry["shape"] = [draw(st.integers(10**6, 10**18)), 1, 28, 28]
    elif what == "no key":
        headers.pop("Authorization")
    elif what == "wrong key":
        headers["Authorization"] = draw(st.sampled_from(["Bearer", "Bearer nope", KEY, "Token " + KEY]))
    elif what == "model":
        path = draw(st.sampled_from(["/v2/models/other/infer", "/v2/models/teacher/versions/7/infer"]))
    elif what == "values":  # JSON data with a few values that do not fit UINT8
        entry.pop("parameters")
        entry["data"] = data = [0] * 1568
        bad = st.sampled_from([-1, 256, 1.5, -0.5, 1e300, 2**70, "7", None, [1], {"a": 1}])
        for pos, value in draw(st.lists(st.tuples(st.integers(0, 1567), bad), min_size=1, max_size=4)):
            data[pos] = value
        body = json.dumps(header).encode()
    if body is None:
        text = json.dumps(header).encode()
        body = text + pixels
        headers[HEADER_LENGTH] = str(len(text))
    if what == "truncated":  # the binary part shorter than the JSON declares
        body = body[: draw(st.integers(len(text), len(body) - 1))]
    elif what == "header length":
        headers[HEADER_LENGTH] = draw(st.sampled_from(["", "x", "-1", str(len(body) + 1), "0",
                                                       str(len(text) - 1), "1e3"]))
    elif what == "bad gzip":
        packed = gzip.compress(body)
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate"]))
        body = draw(st.sampled_from([packed[:-9], packed[:20], packed + b"x", b"\x1f\x8b" + body[:50],
                                     zlib.compress(body)[:-5], body]))
        if headers["Content-Encoding"] == "deflate" and body == packed[:-9]:
            body = zlib.compress(text + pixels)[:-3]
    elif what == "gzip bomb":  # 10 MB of zeros in 10 KB, over the 60 KB limit once decompressed
        headers["Content-Encoding"] = "gzip"
        body = BOMB
    elif what == "encoding":
        headers["Content-Encoding"] = draw(st.sampled_from(["br", "compress", "gzip, gzip", "zstd", "x"]))
    head = raw_head(path, headers, len(body))
    if what == "framing":  # broken HTTP: uvicorn (h11) answers 400 or closes
        head = draw(st.sampled_from([
            head.replace(b"Content-Length", b"Transfer-Encoding: chunked\r\nContent-Length"),
            raw_head(path, {**headers, "Transfer-Encoding": "chunked"}) + b"zz\r\n" + body[:20],
            head.replace(f"Content-Length: {len(body)}".encode(), b"Content-Length: -5"),
            head.replace(f"Content-Length: {len(body)}".encode(), b"Content-Length: 12abc"),
            b"GARBAGE / HTTP/1.1\r\n\r\n",
            b"POST " + INFER.encode() + b" HTTP/9.9\r\nHost: x\r\n\r\n",
            raw_head(path, {**headers, "X-Long": "a" * 70_000}, len(body)),
        ]))
    elif what in ("short body", "half-open"):  # a body shorter than its Content-Length
        body = body[: draw(st.integers(0, len(body) - 1))]
        end = "half-close" if what == "short body" else "keep-open"
    return what, head + body, end


BOMB = gzip.compress(b"{}" + bytes(10_000_000))


def send(port: int, data: bytes, end: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 20)
    try:
        sock.sendall(data)
        if end == "half-close":
            sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        pass  # answered and closed before the server read it all
    return sock


def test_500_malformed_requests_get_4xx_or_a_closed_connection_and_charge_nothing(server):
    store, kid = server.app.state.store, server.app.state.key_id(KEY)
    before = store.usage()[kid][0]
    statuses: dict[str, list[int | None]] = {}
    half_open: list[socket.socket] = []  # answered together at the end: no read timeout waited for each

    @settings(max_examples=600, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=hostile_requests())
    def attack(request):
        what, data, end = request
        sock = send(server.port, data, end)
        if end == "keep-open":
            half_open.append(sock)
            statuses.setdefault(what, [])
            return
        with sock:
            status = read_status(sock)  # TimeoutError: the server held the connection
        assert status is None or 400 <= status < 500, (what, status, data.split(b"\r\n\r\n", 1)[-1][:200])
        statuses.setdefault(what, []).append(status)

    attack()
    for sock in half_open:
        with sock:
            status = read_status(sock)
        assert status is None or 400 <= status < 500, ("half-open", status)
        statuses["half-open"].append(status)
    counts = {what: len(s) for what, s in statuses.items()}
    assert sum(counts.values()) >= 500 and set(counts) == set(KINDS), counts
    assert 408 in statuses["half-open"]  # the body read timeout answered them
    assert store.usage()[kid][0] == before  # nothing malformed was charged
    text = httpx.get(server.root + "/metrics").text
    assert 'status="5' not in text  # no 5xx, from the app's own count
    x = images(5, seed=9)
    body, length = encode({}, "inputs", [Tensor("images", x.numpy(), True)])
    r = httpx.post(server.root + INFER, content=body, headers={**AUTH, HEADER_LENGTH: str(length)})
    assert r.status_code == 200 and store.usage()[kid][0] == before + 5
    (out,) = r.json()["outputs"]
    expected = LocalBackend(toy_model()).infer(x).responses
    assert torch.allclose(torch.tensor(out["data"]).reshape(5, 10), expected, atol=1e-6)
