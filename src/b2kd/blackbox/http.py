"""HTTPTeacher: the network backend of the black-box interface (Open Inference Protocol client).

It speaks KServe v2 REST to any server that does (b2kd's own, Triton,
KServe, MLServer), reads the model's input shape and response kind from its
metadata, and sends uint8 images with the binary tensor extension (1 byte per
pixel) unless told to use JSON.

Every request carries an id derived from its content, and a retry resends
the very same id: a server that already answered it (b2kd's replays its
stored answer) never charges twice, not even when a run killed mid-request
re-sends the same batch. Retries back off exponentially on connection
errors and 5xx, and wait as long as ``Retry-After`` says on 429. Bytes are
counted as they travel, bodies only: every attempt that reached the server
counts, and each batch's total is spread over its images.
"""

from __future__ import annotations

import email.utils
import hashlib
import random
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

import httpx
import torch

from b2kd.blackbox.base import (
    BackendAnswer,
    BlackBoxError,
    QuotaExceeded,
    TeacherRefused,
    TeacherUnavailable,
)
from b2kd.blackbox.protocol import (
    HEADER_LENGTH,
    Layout,
    ProtocolError,
    Tensor,
    decode,
    encode,
    header_length,
    parse_json,
)

_MODEL_PATH = re.compile(r"^(?P<prefix>.*?)(?P<model>/v2/models/[^/]+(?:/versions/[^/]+)?)/?$")
DEFAULT_MODEL = "teacher"


def split_url(url: str) -> tuple[str, str]:
    """(server root, model path) of ``http://host:port[/prefix][/v2/models/NAME[/versions/V]]``."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise BlackBoxError(f"teacher URL {url!r} must look like http://HOST:PORT[/v2/models/NAME]")
    match = _MODEL_PATH.match(parsed.path)
    prefix, model = (match["prefix"], match["model"]) if match else (parsed.path.rstrip("/"),
                                                                     f"/v2/models/{DEFAULT_MODEL}")
    return str(parsed.copy_with(path=prefix or "/", query=None, fragment=None)).rstrip("/"), model


def retry_after(response: httpx.Response) -> float | None:
    """Seconds a response asks the client to wait (``Retry-After``: seconds or an HTTP date)."""
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _spread(total: int, n: int) -> list[int]:
    """``total`` bytes over ``n`` images, as evenly as integers allow (sums to ``total``)."""
    q, r = divmod(total, n)
    return [q + (i < r) for i in range(n)]


def _server_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error) if error else response.text[:200].strip() or response.reason_phrase


@dataclass
class Wire:
    """Body bytes that went each way for one request, retries included."""

    sent: int = 0
    received: int = 0


class HTTPTeacher:
    """A teacher behind an Open Inference Protocol server: ``infer(uint8 images) -> BackendAnswer``."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        binary: bool = True,
        batch_size: int = 256,
        timeout: float = 60.0,
        retries: int = 6,
        backoff: float = 0.5,
        max_rate_wait: float = 600.0,
        num_classes: int | None = None,
    ):
        root, self._model_path = split_url(url)
        self.url = root + self._model_path
        self.binary = binary
        self.retries, self.backoff, self.max_rate_wait = retries, backoff, max_rate_wait
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=root, timeout=timeout, headers=headers)
        meta, self.input_name, self.image_shape = self._metadata()
        params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
        stated = params.get("num_classes")
        try:
            self.layout = Layout.from_metadata(meta.get("outputs"), params.get("response"),
                                               stated if isinstance(stated, int) else num_classes)
        except ProtocolError as exc:
            raise BlackBoxError(f"the teacher at {self.url} is not a classifier b2kd can use: {exc}") from None
        self.kind = self.layout.kind
        self.num_classes = self.layout.num_classes
        server_max = params.get("max_batch_size")
        self.batch_size = batch_size
        if isinstance(server_max, int) and server_max > 0:
            self.batch_size = min(batch_size, server_max)

    def _metadata(self) -> tuple[dict[str, Any], str, tuple[int, int, int]]:
        """Model metadata (its outputs tell the kind), the input's name and its (C, H, W)."""
        response, _ = self._send("GET", self._model_path)
        try:
            meta = parse_json(response.content, "model metadata")
            inputs = meta["inputs"]
            if len(inputs) != 1 or inputs[0]["datatype"] != "UINT8":
                raise ProtocolError("b2kd sends one UINT8 input of images")
            shape = [int(d) for d in inputs[0]["shape"]]
            if len(shape) != 4 or min(shape[1:]) < 1:
                raise ProtocolError(f"the input must have shape [-1, C, H, W], not {shape}")
        except KeyError as exc:
            raise BlackBoxError(f"the teacher at {self.url} has no {exc} in its model metadata") from None
        except (ProtocolError, TypeError, ValueError) as exc:
            raise BlackBoxError(f"the teacher at {self.url} has unusable model metadata: {exc}") from None
        return meta, str(inputs[0]["name"]), (shape[1], shape[2], shape[3])

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- one request, with retries ---------------------------------------------------------

    def _refusal(self, response: httpx.Response) -> TeacherRefused:
        message, status = _server_message(response), response.status_code
        if status == 402:
            return QuotaExceeded(f"the teacher's query quota for this API key is spent: {message}")
        if status in (401, 403):
            return TeacherRefused(f"the teacher at {self.url} refused the API key (HTTP {status}): {message};"
                                  " give the right one with --api-key (or teacher.api_key)")
        return TeacherRefused(f"the teacher at {self.url} refused the request (HTTP {status}): {message}")

    def _send(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[httpx.Response, Wire]:
        wire, failures, rate_waited = Wire(), 0, 0.0
        size = len(body or b"")
        while True:
            wait = None
            try:
                response = self._client.request(method, path, content=body, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing left this machine
                problem = f"cannot connect ({exc})"
            except httpx.TransportError as exc:  # sent, then the answer was lost
                wire.sent += size
                problem = f"{type(exc).__name__} ({exc})"
            else:
                wire.sent += size
                wire.received += response.num_bytes_downloaded
                status = response.status_code
                if status < 400:
                    return response, wire
                wait = retry_after(response)
                if status == 429:
                    wait = self.backoff if wait is None else wait
                    if rate_waited + wait > self.max_rate_wait:
                        raise TeacherUnavailable(f"the teacher at {self.url} kept refusing with HTTP 429"
                                                 f" (rate limit) for {rate_waited:.0f} s")
                    rate_waited += wait
                    time.sleep(wait)
                    continue
                if status < 500:
                    raise self._refusal(response)
                problem = f"HTTP {status} ({_server_message(response)})"
            failures += 1
            if failures > self.retries:
                raise TeacherUnavailable(f"the teacher at {self.url} failed {failures} times in a row;"
                                         f" last: {problem}")
            time.sleep(wait if wait is not None else
                       min(self.backoff * 2 ** (failures - 1), 30.0) * (1 + 0.1 * random.random()))

    # --- the backend interface -------------------------------------------------------------

    def _request_id(self, batch: torch.Tensor) -> str:
        """The same batch always gets the same id, so the server can tell a retry from a new query."""
        digest = hashlib.sha256(f"{self.url}|{self.kind}|{self.binary}|{tuple(batch.shape)}|".encode())
        digest.update(batch.numpy().tobytes())
        return "b2kd-" + digest.hexdigest()[:32]

    def _infer_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, Wire]:
        request_id = self._request_id(batch)
        header: dict[str, Any] = {"id": request_id}
        if self.binary:
            header["parameters"] = {"binary_data_output": True}
        body, length = encode(header, "inputs", [Tensor(self.input_name, batch.numpy(), self.binary)])
        headers = ({HEADER_LENGTH: str(length), "Content-Type": "application/octet-stream"}
                   if length is not None else {"Content-Type": "application/json"})
        response, wire = self._send("POST", self._model_path + "/infer", body, headers)
        content = response.content
        try:
            msg = decode(content, header_length(response.headers.get(HEADER_LENGTH), len(content)), "outputs")
            if msg.header.get("id", request_id) != request_id:
                raise ProtocolError(f"answer to request '{msg.header.get('id')}', not '{request_id}'")
            api = self.layout.from_outputs(msg.tensors, len(batch))
        except ProtocolError as exc:
            raise BlackBoxError(f"the teacher at {self.url} sent a malformed answer: {exc}") from None
        return api, wire

    def infer(self, images: torch.Tensor) -> BackendAnswer:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.image_shape:
            raise BlackBoxError(
                f"the teacher accepts uint8 images of shape (N, {', '.join(map(str, self.image_shape))}),"
                f" got {tuple(images.shape)} {images.dtype}"
            )
        images = images.cpu().contiguous()
        rows, sent, received = [], [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            api, wire = self._infer_batch(batch)
            rows.append(api)
            sent += _spread(wire.sent, len(batch))
            received += _spread(wire.received, len(batch))
        return BackendAnswer(responses=torch.cat(rows), bytes_sent=sent, bytes_received=received)

