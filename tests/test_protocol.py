"""The Open Inference Protocol codec: round trips, byte counts, and every malformed body refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from b2kd.blackbox import ResponseKind
from b2kd.blackbox.protocol import (
    Layout,
    ProtocolError,
    Tensor,
    decode,
    encode,
    header_length,
)

KINDS = ["soft", "topk:3", "rounded:2", "hard"]


def _images(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def _roundtrip(body: bytes, length: int | None, key: str = "inputs", **kw):
    return decode(body, header_length(None if length is None else str(length), len(body)), key, **kw)


@pytest.mark.parametrize("binary", [True, False])
def test_images_round_trip(binary):
    x = _images(5)
    body, length = encode({"id": "r1"}, "inputs", [Tensor("images", x, binary)])
    msg = _roundtrip(body, length)
    assert msg.header["id"] == "r1"
    assert msg.tensors["images"].dtype == np.uint8 and np.array_equal(msg.tensors["images"], x)
    if binary:  # the JSON header, then exactly one byte per pixel
        assert len(body) == length + x.size
        assert json.loads(body[:length])["inputs"][0]["parameters"] == {"binary_data_size": x.size}
    else:
        assert length is None and json.loads(body)["inputs"][0]["data"] == x.ravel().tolist()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("binary", [True, False])
def test_every_response_kind_round_trips_exactly(kind, binary):
    probs = torch.softmax(torch.randn(6, 10, generator=torch.Generator().manual_seed(1)), 1)
    api = ResponseKind.parse(kind).apply(probs)
    layout = Layout.of(kind, 10)
    arrays = layout.to_outputs(api)
    body, length = encode({"model_name": "teacher"}, "outputs",
                          [Tensor(name, a, binary) for name, a in arrays.items()])
    back = layout.from_outputs(_roundtrip(body, length, "outputs").tensors, 6)
    torch.testing.assert_close(back, api, rtol=0, atol=0, equal_nan=True)
    sizes = {"soft": 40, "rounded:2": 40, "topk:3": 24, "hard": 4}  # bytes per image, binary
    if binary:
        assert len(body) - length == 6 * sizes[kind]


def test_layout_of_servers_that_are_not_b2kd():
    soft = Layout.from_metadata([{"name": "logits", "datatype": "FP32", "shape": [-1, 7]}], None, None)
    assert (str(soft.kind), soft.num_classes, soft.names) == ("soft", 7, {"probabilities": "logits"})
    top = Layout.from_metadata([{"name": "idx", "datatype": "INT64", "shape": [-1, 2]},
                                {"name": "p", "datatype": "FP32", "shape": [-1, 2]}], None, 10)
    assert str(top.kind) == "topk:2" and top.names == {"topk_indices": "idx", "topk_values": "p"}
    hard = Layout.from_metadata([{"name": "cls", "datatype": "INT32", "shape": [-1]}], None, 10)
    assert hard.kind.is_hard
    with pytest.raises(ProtocolError, match="number of classes"):
        Layout.from_metadata([{"name": "cls", "datatype": "INT32", "shape": [-1]}], None, None)
    with pytest.raises(ProtocolError, match="cannot tell"):
        Layout.from_metadata([{"name": "a", "datatype": "FP32", "shape": [-1, 3]}] * 2, None, None)
    with pytest.raises(ProtocolError, match="unknown response kind"):
        Layout.from_metadata([], "probabilities", 10)


def test_answers_that_break_the_layout_are_refused():
    layout = Layout.of("hard", 10)
    with pytest.raises(ProtocolError, match="labels"):
        layout.from_outputs({"label": np.array([3, 10], dtype=np.int32)}, 2)
    with pytest.raises(ProtocolError, match="lacks output"):
        layout.from_outputs({"probabilities": np.zeros((2, 10), np.float32)}, 2)
    with pytest.raises(ProtocolError, match="shape"):
        Layout.of("soft", 10).from_outputs({"probabilities": np.zeros((3, 10), np.float32)}, 2)


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


def _entry(**kw):
    return {"name": "images", "datatype": "UINT8", "shape": [1, 2], **kw}


MALFORMED = {
    "not json": (b"{nope", None, "not valid JSON"),
    "not utf-8": (b"\xff\xfe{}", None, "not valid JSON"),
    "not an object": (b"[1, 2]", None, "JSON object"),
    "no inputs": (_json({"inputs": []}), None, "non-empty list"),
    "nan": (b'{"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1], "data": [NaN]}]}',
            None, "NaN"),
    "floats as uint8": (_json({"inputs": [_entry(data=[1.5, 2])]}), None, "do not fit"),
    "out of range": (_json({"inputs": [_entry(data=[256, 0])]}), None, "outside"),
    "too few values": (_json({"inputs": [_entry(data=[1])]}), None, "1 values for shape"),
    "ragged": (_json({"inputs": [_entry(data=[[1], [2, 3]])]}), None, "regular array"),
    "negative size": (_json({"inputs": [_entry(shape=[-1, 2], data=[1, 2])]}), None, ">= 0"),
    "bool size": (_json({"inputs": [_entry(shape=[True, 2], data=[1, 2])]}), None, ">= 0"),
    "bad datatype": (_json({"inputs": [_entry(datatype="UINT9", data=[1, 2])]}), None, "unsupported"),
    "datatype a list": (_json({"inputs": [_entry(datatype=["UINT8"], data=[1, 2])]}), None, "unsupported"),
    "datatype an object": (_json({"inputs": [_entry(datatype={"UINT8": 1}, data=[1, 2])]}), None,
                           "unsupported"),
    "strings": (_json({"inputs": [_entry(data=["a", "b"])]}), None, "do not fit"),
    "duplicate": (_json({"inputs": [_entry(data=[1, 2]), _entry(data=[1, 2])]}), None, "twice"),
    "binary, no header": (_json({"inputs": [_entry(parameters={"binary_data_size": 2})]}), None,
                          "no Inference-Header-Content-Length"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_raise_protocol_errors(case):
    body, length, needle = MALFORMED[case]
    with pytest.raises(ProtocolError, match=needle) as info:
        _roundtrip(body, length)
    assert info.value.status == 400


def test_binary_lengths_are_checked():
    x = _images(2)
    body, length = encode({}, "inputs", [Tensor("images", x)])
    with pytest.raises(ProtocolError, match="truncated"):
        _roundtrip(body[:-1], length)
    with pytest.raises(ProtocolError, match="bytes of binary data follow"):
        _roundtrip(body + b"\0", length)
    with pytest.raises(ProtocolError, match="must be an integer"):
        header_length("12x", len(body))
    with pytest.raises(ProtocolError, match="but the body has"):
        header_length(str(len(body) + 1), len(body))
    head = json.loads(body[:length])
    head["inputs"][0]["parameters"]["binary_data_size"] = 10**12
    text = _json(head)
    with pytest.raises(ProtocolError, match="takes 1568"):
        _roundtrip(text + body[length:], len(text))


def test_huge_declared_shapes_are_refused_before_allocating():
    body = _json({"inputs": [_entry(shape=[10**9, 1, 28, 28], data=[])]})
    with pytest.raises(ProtocolError, match="too large .* at most 784") as info:
        _roundtrip(body, None, max_elements=784)
    assert info.value.status == 413


@settings(max_examples=300, deadline=None, derandomize=True)
@given(body=st.binary(max_size=300), length=st.one_of(st.none(), st.integers(-5, 400)))
def test_decoding_arbitrary_bytes_only_ever_raises_protocol_errors(body, length):
    try:
        _roundtrip(body, length, max_elements=10_000)
    except ProtocolError as exc:
        assert 400 <= exc.status < 500 and str(exc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(fields=st.dictionaries(st.sampled_from(["name", "datatype", "shape", "data", "parameters"]),
                              json_values))
def test_any_json_in_any_tensor_field_only_ever_raises_protocol_errors(fields):
    """Non-string datatypes, listed names, nested shapes...: a 4xx each, never a TypeError (a 500)."""
    entry = {**_entry(data=[1, 2]), **fields}
    try:
        _roundtrip(_json({"inputs": [entry]}), None, max_elements=10_000)
    except ProtocolError as exc:
        assert 400 <= exc.status < 500 and str(exc)


def test_nothing_but_finite_json_is_sent():
    with pytest.raises(ValueError):
        encode({"x": math.nan}, "inputs", [Tensor("images", _images(1), False)])
