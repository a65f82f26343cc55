"""The Open Inference Protocol (KServe v2 REST) as b2kd speaks it, both ways.

A message (an inference request or response) is a JSON object whose
``inputs`` or ``outputs`` list tensors by name, datatype and shape. Each
tensor's values are either a JSON list in ``data`` or, with the binary
tensor-data extension, ``parameters.binary_data_size`` raw little-endian
bytes appended after the JSON, whose length the ``Inference-Header-Content-Length``
header gives. Binary is what lets a uint8 image travel at 1 byte per pixel.

Decoding is written for hostile input: every way a body can be wrong raises
:class:`ProtocolError` with an HTTP status and a message, nothing else, and
sizes are checked against limits before any large allocation.

:class:`Layout` maps a response kind onto the output tensors a classifier
server returns, so the same code builds the server's answers and reads any
protocol server's answers back into b2kd's dense API form.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from b2kd.blackbox.responses import ResponseKind, ResponseKindError

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"
MAX_ID_LENGTH = 256

#: v2 datatype -> little-endian numpy dtype (BYTES, variable-length strings, is not supported).
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
        "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
        "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
        "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
    }.items()
}
_KINDS_ALLOWED = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}  # JSON value kinds each dtype accepts


class ProtocolError(ValueError):
    """A message that breaks the protocol; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def datatype_of(array: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if array.dtype.newbyteorder("<") == dtype:
            return name
    raise ProtocolError(f"no protocol datatype for numpy {array.dtype}")


# --- encoding -------------------------------------------------------------------------------


@dataclass
class Tensor:
    """One named tensor of a message, and whether its values travel as binary."""

    name: str
    array: np.ndarray
    binary: bool = True


def encode(header: dict[str, Any], key: str, tensors: list[Tensor]) -> tuple[bytes, int | None]:
    """Body and header length (None: pure JSON) of a message listing ``tensors`` under ``key``."""
    entries, chunks = [], []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": datatype_of(t.array),
                                 "shape": list(t.array.shape)}
        if t.binary:
            raw = np.ascontiguousarray(t.array, dtype=DATATYPES[entry["datatype"]]).tobytes()
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = t.array.ravel().tolist()
        entries.append(entry)
    text = json.dumps({**header, key: entries}, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return text, None
    return text + b"".join(chunks), len(text)


# --- decoding -------------------------------------------------------------------------------


def _reject_constant(name: str) -> None:
    raise ProtocolError(f"{name} is not valid JSON (NaN and Infinity are not numbers in JSON)")


def _int(value: Any, what: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ProtocolError(f"{what} must be an integer >= {low}, got {value!r:.60}")
    return value


def header_length(raw: str | None, body_length: int) -> int | None:
    """The JSON part's length from the ``Inference-Header-Content-Length`` header, checked."""
    if raw is None:
        return None
    try:
        length = int(raw.strip())
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH} must be an integer, got {raw!r:.60}") from None
    if not 0 < length <= body_length:
        raise ProtocolError(f"{HEADER_LENGTH} is {length} but the body has {body_length} bytes")
    return length


def parse_json(text: bytes, what: str = "body") -> dict[str, Any]:
    """A JSON object, or a ProtocolError saying why not."""
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ProtocolError(f"the {what} is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"the {what} must be a JSON object")
    return obj


def _from_json_data(data: Any, dtype: np.dtype, shape: tuple[int, ...], name: str) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f"tensor '{name}': data must be a list")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise ProtocolError(f"tensor '{name}': data is not a regular array of numbers") from None
    if array.size != math.prod(shape):
        raise ProtocolError(f"tensor '{name}': {array.size} values for shape {list(shape)}")
    if array.size and array.dtype.kind not in _KINDS_ALLOWED.get(dtype.kind, ""):
        raise ProtocolError(f"tensor '{name}': values of type {array.dtype} do not fit its datatype")
    if array.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise ProtocolError(f"tensor '{name}': values outside [{info.min}, {info.max}]")
    return array.astype(dtype).reshape(shape)


@dataclass
class Message:
    """A decoded request or response: its JSON header and its tensors by name."""

    header: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def decode(body: bytes, length: int | None, key: str, max_elements: int | None = None) -> Message:
    """Parse a message whose tensors are listed under ``key``; ``length`` from :func:`header_length`.

    ``max_elements`` bounds the values of each tensor, checked on the declared
    shape before anything is allocated (a server's defence against huge shapes).
    """
    header = parse_json(body if length is None else body[:length], "JSON header")
    binary = memoryview(body)[length:] if length is not None else memoryview(b"")
    entries = header.get(key)
    if not isinstance(entries, list) or not entries:
        raise ProtocolError(f"'{key}' must be a non-empty list of tensors")
    message, offset = Message(header), 0
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ProtocolError(f"{key}[{i}] must be an object")
        name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
        if not isinstance(name, str) or not name or len(name) > MAX_ID_LENGTH:
            raise ProtocolError(f"{key}[{i}] needs a name (a non-empty string)")
        if name in message.tensors:
            raise ProtocolError(f"tensor '{name}' is given twice")
        if not isinstance(datatype, str) or datatype not in DATATYPES:  # a list is unhashable
            raise ProtocolError(f"tensor '{name}': unsupported datatype {datatype!r:.40};"
                                f" use one of {', '.join(DATATYPES)}")
        if not isinstance(shape, list) or len(shape) > 8:
            raise ProtocolError(f"tensor '{name}': shape must be a list of at most 8 sizes")
        dims = tuple(_int(d, f"tensor '{name}': each size of its shape") for d in shape)
        count = math.prod(dims)
        if max_elements is not None and count > max_elements:
            raise ProtocolError(f"tensor '{name}': shape {list(dims)} is too large ({count} values,"
                                f" at most {max_elements})", 413)
        dtype = DATATYPES[datatype]
        params = entry.get("parameters")
        if params is None:  # optional in the v2 spec; kserve sends "parameters": null
            params = {}
        if not isinstance(params, dict):
            raise ProtocolError(f"tensor '{name}': parameters must be an object")
        if BINARY_SIZE in params:
            if length is None:
                raise ProtocolError(f"tensor '{name}' declares binary data but the request has no"
                                    f" {HEADER_LENGTH} header")
            if "data" in entry:
                raise ProtocolError(f"tensor '{name}' has both data and {BINARY_SIZE}")
            size = _int(params[BINARY_SIZE], f"tensor '{name}': {BINARY_SIZE}")
            if size != count * dtype.itemsize:
                raise ProtocolError(f"tensor '{name}': {BINARY_SIZE} is {size} but shape"
                                    f" {list(dims)} of {datatype} takes {count * dtype.itemsize}")
            if offset + size > len(binary):
                raise ProtocolError(f"tensor '{name}': binary data truncated ({len(binary) - offset}"
                                    f" bytes left, {size} declared)")
            array = np.frombuffer(binary[offset : offset + size], dtype=dtype).reshape(dims)
            offset += size
        else:
            array = _from_json_data(entry.get("data"), dtype, dims, name)
        message.tensors[name] = array
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data follow the tensors")
    return message


# --- response kinds as output tensors -------------------------------------------------------

#: Output tensor names of a b2kd server, by role.
PROBABILITIES, LABEL, TOPK_INDICES, TOPK_VALUES = "probabilities", "label", "topk_indices", "topk_values"
#: The gray-box output: the teacher's penultimate-layer embedding, FP32 (N, D).
EMBEDDING = "embedding"


@dataclass(frozen=True)
class Layout:
    """How a response kind travels: which output tensors, of which shapes and datatypes."""

    kind: ResponseKind
    num_classes: int
    names: dict[str, str]  # role -> output tensor name on the server
    embedding_dim: int | None = None  # D of the embedding output of a ``+embedding`` kind

    @classmethod
    def of(cls, kind: ResponseKind | str, num_classes: int, embedding_dim: int | None = None) -> Layout:
        """The layout a b2kd server uses for ``kind``."""
        kind = ResponseKind.parse(kind)
        roles = {"hard": (LABEL,), "topk": (TOPK_INDICES, TOPK_VALUES)}.get(kind.name, (PROBABILITIES,))
        if kind.embedding:
            if not embedding_dim:
                raise ValueError(f"a '{kind}' layout needs the embedding's size")
            roles = (*roles, EMBEDDING)
        return cls(kind, num_classes, {role: role for role in roles},
                   embedding_dim if kind.embedding else None)

    def without_embedding(self) -> Layout:
        """The same outputs but the embedding (a client that reads only the probabilities)."""
        names = {role: name for role, name in self.names.items() if role != EMBEDDING}
        return Layout(self.kind.base, self.num_classes, names)

    @property
    def k(self) -> int:
        return min(self.kind.param or 1, self.num_classes)

    def metadata(self) -> list[dict[str, Any]]:
        """The ``outputs`` entry of the model metadata."""
        specs = {PROBABILITIES: ("FP32", [-1, self.num_classes]), LABEL: ("INT32", [-1]),
                 TOPK_INDICES: ("INT32", [-1, self.k]), TOPK_VALUES: ("FP32", [-1, self.k]),
                 EMBEDDING: ("FP32", [-1, self.embedding_dim or 0])}
        return [{"name": name, "datatype": specs[role][0], "shape": specs[role][1]}
                for role, name in self.names.items()]

    def to_outputs(self, api: torch.Tensor, embeddings: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Output tensors of API-form rows (N, K) (and embeddings (N, D)), as the server sends them."""
        api = api.detach().float().cpu()
        if self.kind.name == "hard":
            arrays = {LABEL: api.argmax(1).numpy().astype(np.int32)}
        elif self.kind.name == "topk":
            top = torch.nan_to_num(api, nan=-math.inf).topk(self.k, dim=1)
            arrays = {TOPK_INDICES: top.indices.numpy().astype(np.int32),
                      TOPK_VALUES: top.values.numpy().astype(np.float32)}
        else:
            arrays = {PROBABILITIES: api.numpy().astype(np.float32)}
        if EMBEDDING in self.names:
            arrays[EMBEDDING] = embeddings.detach().float().cpu().numpy()
        return {self.names[role]: a for role, a in arrays.items()}

    def embeddings_from_outputs(self, tensors: dict[str, np.ndarray], n: int) -> torch.Tensor | None:
        """The embedding output (n, D) of an answer, checked for shape and type (None: not asked for)."""
        if EMBEDDING not in self.names:
            return None
        name = self.names[EMBEDDING]
        if name not in tensors:
            raise ProtocolError(f"the answer lacks output '{name}'")
        array = tensors[name]
        if array.ndim != 2 or len(array) != n or array.dtype.kind != "f" or (
                self.embedding_dim is not None and array.shape[1] != self.embedding_dim):
            raise ProtocolError(f"output '{name}' must be floats of shape ({n}, {self.embedding_dim or 'D'}),"
                                f" got {array.dtype} {array.shape}")
        return torch.from_numpy(array.astype(np.float32))

    def from_outputs(self, tensors: dict[str, np.ndarray], n: int) -> torch.Tensor:
        """API-form rows (n, K) from a server's output tensors, checked for shape and range."""
        arrays = {}
        for role, name in self.names.items():
            if role == EMBEDDING:
                continue  # read by embeddings_from_outputs
            if name not in tensors:
                raise ProtocolError(f"the answer lacks output '{name}'")
            arrays[role] = tensors[name]
        K = self.num_classes
        if self.kind.name == "hard":
            label = arrays[LABEL].reshape(-1)
            if label.dtype.kind not in "iu" or len(label) != n or (label < 0).any() or (label >= K).any():
                raise ProtocolError(f"output '{self.names[LABEL]}' must hold {n} labels in [0, {K})")
            return torch.nn.functional.one_hot(torch.from_numpy(label.astype(np.int64)), K).float()
        if self.kind.name == "topk":
            idx, val = arrays[TOPK_INDICES], arrays[TOPK_VALUES]
            if (idx.shape != (n, self.k) or val.shape != (n, self.k) or idx.dtype.kind not in "iu"
                    or (idx < 0).any() or (idx >= K).any()):
                raise ProtocolError(f"top-k outputs must be ({n}, {self.k}) with indices in [0, {K})")
            out = torch.full((n, K), math.nan)
            return out.scatter_(1, torch.from_numpy(idx.astype(np.int64)),
                                torch.from_numpy(val.astype(np.float32)))
        probs = arrays[PROBABILITIES]
        if probs.shape != (n, K) or probs.dtype.kind != "f":
            raise ProtocolError(f"output '{self.names[PROBABILITIES]}' must be floats of shape ({n}, {K}),"
                                f" got {probs.dtype} {probs.shape}")
        return torch.from_numpy(probs.astype(np.float32))

    @classmethod
    def from_metadata(cls, outputs: list[dict[str, Any]], response: str | None,
                      num_classes: int | None, embedding_output: str | None = None) -> Layout:
        """The layout of any protocol server's classifier, from its model metadata.

        A b2kd server names its response kind in the metadata's parameters; for
        other servers the kind is read off the outputs: one float (N, K) output is
        ``soft``, one integer (N,) output is ``hard`` (K must then be given), an
        integer and a float (N, k) output are ``topk:k``. A gray-box server's
        embedding is the float (N, D) output named ``embedding_output`` (a b2kd
        server's is ``embedding``, named by its ``+embedding`` kind); it is set
        apart before the rest is read.
        """
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise ProtocolError("the model metadata's outputs must be a list of objects")
        try:
            stated = ResponseKind.parse(response) if response else None
        except ResponseKindError as exc:
            raise ProtocolError(f"the server names an unknown response kind: {exc}") from None
        if embedding_output is None and stated is not None and stated.embedding:
            embedding_output = EMBEDDING
        if embedding_output is not None:
            found = [o for o in outputs if o.get("name") == embedding_output]
            if len(found) != 1:
                raise ProtocolError(f"the model has no output '{embedding_output}' (its embedding);"
                                    f" outputs: {[o.get('name') for o in outputs]}")
            shape = found[0].get("shape")
            if (not str(found[0].get("datatype", "")).startswith("FP") or not isinstance(shape, list)
                    or len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 1):
                raise ProtocolError(f"output '{embedding_output}' must be floats of shape [-1, D],"
                                    f" got {found[0].get('datatype')} {shape!r:.60}")
            rest = cls.from_metadata([o for o in outputs if o is not found[0]],
                                     str(stated.base) if stated else None, num_classes)
            return cls(ResponseKind(rest.kind.name, rest.kind.param, True), rest.num_classes,
                       {**rest.names, EMBEDDING: embedding_output}, shape[1])
        def dims(o: dict) -> list[int]:
            shape = o.get("shape")
            if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
                raise ProtocolError(f"output {o.get('name')!r:.40} has no valid shape")
            return shape

        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise ProtocolError("the model metadata's outputs must be a list of objects")
        floats = [o for o in outputs if str(o.get("datatype", "")).startswith("FP")]
        ints = [o for o in outputs if str(o.get("datatype", "")).startswith(("INT", "UINT"))]
        try:
            kind = ResponseKind.parse(response) if response else None
        except ResponseKindError as exc:
            raise ProtocolError(f"the server names an unknown response kind: {exc}") from None
        if (kind is None or kind.name == "topk") and len(floats) == 1 and len(ints) == 1:
            k = dims(floats[0])[-1]
            if num_classes is None:
                raise ProtocolError("a top-k server must state its number of classes")
            names = {TOPK_INDICES: ints[0]["name"], TOPK_VALUES: floats[0]["name"]}
            return cls(kind or ResponseKind("topk", k), num_classes, names)
        if (kind is None or kind.is_hard) and len(ints) == 1 and not floats:
            if num_classes is None:
                raise ProtocolError("a server that answers labels only must state its number of classes")
            return cls(kind or ResponseKind("hard"), num_classes, {LABEL: ints[0]["name"]})
        if (kind is None or kind.name in ("soft", "rounded")) and len(floats) == 1 and not ints:
            shape = dims(floats[0])
            if len(shape) != 2 or shape[1] < 2:
                raise ProtocolError(f"output '{floats[0]['name']}' must have shape [-1, K], got {shape}")
            return cls(kind or ResponseKind("soft"), shape[1], {PROBABILITIES: floats[0]["name"]})
        raise ProtocolError("cannot tell the response kind from the model's outputs"
                            f" {[o.get('name') for o in outputs]}")
