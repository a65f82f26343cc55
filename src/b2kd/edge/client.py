"""HTTPTeacher: the network backend of the black-box interface (Open Inference Protocol client).

It speaks KServe v2 REST to any server that does (b2kd's own, Triton,
KServe, MLServer). From the model's metadata it reads the input's datatype
and shape (UINT8, FP32 or FP16; ``[-1, C, H, W]`` or a fixed batch size) and
the response kind; from ``/v2/models/NAME/config``, when the server has it
(Triton), the largest batch. uint8 images travel as they are (1 byte per
pixel with the binary tensor extension, unless told to use JSON), or as the
normalised floats the model takes (b2kd.edge.preprocess: 4 bytes per
pixel for FP32). Answers are logits or probabilities as ``output`` states,
and every answer is validated (b2kd.blackbox.validate) before it is returned.

Every request carries an id derived from its content, and a retry resends
the very same id: a server that already answered it (b2kd's replays its
stored answer) never charges twice, not even when a run killed mid-request
re-sends the same batch. Every wait is bounded: connection errors and 5xx are
retried ``retries`` times with exponential backoff; 429 and 503 wait what a
finite ``Retry-After`` asks (at least ``backoff``, at most ``max_wait`` each);
a request gives up after ``max_total_wait`` seconds in all, at once when the
server asks for longer. 501 (not implemented) is permanent and not retried.
Bytes are counted as they travel, bodies only: every attempt that reached the
server counts, and each batch's total is spread over its images.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

import httpx
import torch

from b2kd.blackbox.base import (
    BackendAnswer,
    BlackBoxError,
    QuotaExceeded,
    TeacherRefused,
    TeacherUnavailable,
)
from b2kd.edge.preprocess import Preprocess, PreprocessError
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
from b2kd.blackbox.validate import check, check_embeddings, softmax_of_logits

if TYPE_CHECKING:
    from b2kd.config import TeacherConfig

log = logging.getLogger(__name__)

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


#: Statuses that no retry can change (501: the server does not implement the request).
PERMANENT = (501, 505)
OUTPUTS = ("probabilities", "logits")


def retry_after(response: httpx.Response) -> float | None:
    """Seconds a response asks the client to wait (``Retry-After``: seconds or an HTTP date).

    None when it asks nothing usable (absent, not finite, not a number or a date);
    a negative wait or a date past is 0.
    """
    raw = response.headers.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
            seconds = (when - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError, OverflowError):
            return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def key_exposure(url: str, api_key: str | None) -> str | None:
    """A warning when an API key would travel in clear text (plain http:// to another host)."""
    parsed = httpx.URL(url)
    if not api_key or parsed.scheme != "http" or is_loopback(parsed.host):
        return None
    return (f"warning: the API key goes to {parsed.host} over plain http://, readable by anyone on the"
            " way; use https:// (TLS) for a teacher on another host")


def _spread(total: int, n: int) -> list[int]:
    """``total`` bytes over ``n`` images, as evenly as integers allow (sums to ``total``)."""
    q, r = divmod(total, n)
    return [q + (i < r) for i in range(n)]


def _server_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return str(error)[:200] if error else response.text[:200].strip() or response.reason_phrase


@dataclass
class Wire:
    """Body bytes that went each way for one request, retries included."""

    sent: int = 0
    received: int = 0


class HTTPTeacher:
    """A teacher behind an Open Inference Protocol server: ``infer(uint8 images) -> BackendAnswer``.

    ``input_preset`` / ``input_scale`` / ``input_mean`` / ``input_std`` say how
    pixels become a float model's inputs (b2kd.edge.preprocess); ``output``
    is ``probabilities`` or ``logits`` (turned into probabilities by a softmax).
    """

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
        max_wait: float = 60.0,
        max_total_wait: float = 600.0,
        num_classes: int | None = None,
        output: str = "probabilities",
        input_preset: str | None = None,
        input_scale: float | None = None,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        embedding_output: str | None = None,
    ):
        root, self._model_path = split_url(url)
        self._embedding_output = embedding_output
        self.url = root + self._model_path
        if output not in OUTPUTS:
            raise BlackBoxError(f"teacher.output must be one of {', '.join(OUTPUTS)}, not {output!r}")
        self.binary, self.output = binary, output
        self.retries, self.backoff = retries, backoff
        self.max_wait, self.max_total_wait = max_wait, max_total_wait
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        exposed = key_exposure(root, api_key)
        if exposed:
            log.warning("%s", exposed)
        self._client = httpx.Client(base_url=root, timeout=timeout, headers=headers)
        try:
            self._open(batch_size, num_classes, input_preset, input_scale, input_mean, input_std)
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(cls, teacher: TeacherConfig, **overrides: Any) -> HTTPTeacher:
        """The client of ``teacher.url`` with every ``teacher.*`` setting of a run's config."""
        settings = {
            "binary": teacher.binary, "timeout": teacher.timeout_s, "retries": teacher.retries,
            "backoff": teacher.backoff_s, "max_wait": teacher.max_wait_s,
            "max_total_wait": teacher.max_total_wait_s, "output": teacher.output,
            "input_preset": teacher.input_preset, "input_scale": teacher.input_scale,
            "input_mean": teacher.input_mean, "input_std": teacher.input_std,
            "embedding_output": teacher.embedding_output,
        }
        return cls(teacher.url, teacher.api_key, **{**settings, **overrides})

    def _open(self, batch_size: int, num_classes: int | None, preset, scale, mean, std) -> None:
        """Read the model's metadata (and config) and settle how images go and answers come back."""
        response, _ = self._send("GET", self._model_path)
        what = f"the teacher at {self.url}"
        try:
            meta = parse_json(response.content, "model metadata")
            self.input_name, self.fixed_batch, self.image_shape = self._input_spec(meta)
            datatype = meta["inputs"][0]["datatype"]
            self.preprocess = Preprocess.build(datatype, self.image_shape[0], preset, scale, mean, std)
        except KeyError as exc:
            raise BlackBoxError(f"{what} has no {exc} in its model metadata") from None
        except PreprocessError as exc:
            raise BlackBoxError(f"{what} cannot take b2kd's images as stated: {exc}") from None
        except (ProtocolError, TypeError, ValueError) as exc:
            raise BlackBoxError(f"{what} has unusable model metadata: {exc}") from None
        params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
        stated = params.get("num_classes")
        try:
            self.layout = Layout.from_metadata(meta.get("outputs"), params.get("response"),
                                               stated if isinstance(stated, int) else num_classes,
                                               self._embedding_output)
        except ProtocolError as exc:
            raise BlackBoxError(f"{what} is not a classifier b2kd can use: {exc}") from None
        if self.output == "logits" and self.layout.kind.name != "soft":
            raise BlackBoxError(f"teacher.output is 'logits' but {what} answers"
                                f" '{self.layout.kind}' responses; logits come as one float output"
                                " [-1, K]")
        self.kind = self.layout.kind
        self.num_classes = self.layout.num_classes
        self.embedding_dim = self.layout.embedding_dim
        # a gray-box server's answers are asked for by output name, so that a client that reads
        # only the probabilities (without_embedding) is not sent the embedding
        self._name_outputs = self.layout.embedding_dim is not None
        self.batch_size = batch_size
        for server_max in (params.get("max_batch_size"), self._config_max_batch()):
            if isinstance(server_max, int) and not isinstance(server_max, bool) and server_max > 0:
                self.batch_size = min(self.batch_size, server_max)
        if self.fixed_batch is not None:
            self.batch_size = self.fixed_batch

    @staticmethod
    def _input_spec(meta: dict[str, Any]) -> tuple[str, int | None, tuple[int, int, int]]:
        """(input name, fixed batch size or None, (C, H, W)) of the one image input."""
        inputs = meta["inputs"]
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise ProtocolError("b2kd sends one input of images; the model must take exactly one")
        name, datatype, shape = inputs[0]["name"], inputs[0]["datatype"], inputs[0]["shape"]
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise ProtocolError("the input's name and datatype must be strings")
        if (not isinstance(shape, list) or len(shape) != 4
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
                or min(shape[1:]) < 1 or shape[0] == 0 or shape[0] < -1):
            raise ProtocolError(f"the input must have shape [-1, C, H, W] or [N, C, H, W], not {shape!r:.80}")
        return name, None if shape[0] == -1 else shape[0], (shape[1], shape[2], shape[3])

    def _config_max_batch(self) -> int | None:
        """``max_batch_size`` from ``/v2/models/NAME/config`` (Triton states it there), or None.

        One plain request: a server without the endpoint (404), or any failure, means no limit is known.
        """
        try:
            response = self._client.get(self._model_path + "/config")
            if response.status_code != 200:
                return None
            value = parse_json(response.content, "model config").get("max_batch_size")
        except (httpx.HTTPError, ProtocolError):
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

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

    def _wait(self, asked: float | None, attempt: int) -> float:
        """Seconds before the next attempt: what the server asked when it is at least ``backoff``,
        else exponential backoff with jitter; never more than ``max_wait``."""
        if asked is not None and asked >= self.backoff:
            return min(asked, self.max_wait)
        backoff = self.backoff * 2 ** min(attempt - 1, 30) * (1 + 0.1 * random.random())
        return min(backoff, self.max_wait)

    def _send(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> tuple[httpx.Response, Wire]:
        wire, failures, refusals, attempts = Wire(), 0, 0, 0
        size = len(body or b"")
        start = time.monotonic()
        while True:
            asked = None
            attempts += 1
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
                if (status < 500 and status != 429) or status in PERMANENT:
                    raise self._refusal(response)
                asked = retry_after(response)
                problem = f"HTTP {status} ({_server_message(response)})"
                if status == 429:
                    problem = f"HTTP 429 (rate limit: {_server_message(response)})"
            if problem.startswith("HTTP 429"):
                refusals += 1
                attempt = refusals
            else:
                failures += 1
                attempt = failures
                if failures > self.retries:
                    raise TeacherUnavailable(f"the teacher at {self.url} failed {failures} times in a row;"
                                             f" last: {problem}")
            elapsed = time.monotonic() - start
            honoured = asked is not None and asked >= self.backoff  # else the backoff is waited
            if honoured and elapsed + asked > self.max_total_wait:
                raise TeacherUnavailable(
                    f"the teacher at {self.url} answered {problem} and asks to wait {asked:.0f} s"
                    f" (Retry-After), more than teacher.max_total_wait_s = {self.max_total_wait:g} s"
                    " allows; try again later")
            wait = self._wait(asked, attempt)
            if elapsed + wait > self.max_total_wait:
                raise TeacherUnavailable(
                    f"the teacher at {self.url} did not answer within teacher.max_total_wait_s ="
                    f" {self.max_total_wait:g} s ({attempts} attempts); last: {problem}")
            time.sleep(wait)

    def without_embedding(self) -> None:
        """Read only the probabilities (or labels) of a gray-box server: the embedding is
        neither asked for nor paid for in bytes."""
        self.layout = self.layout.without_embedding()
        self.kind, self.embedding_dim = self.layout.kind, None

    # --- the backend interface -------------------------------------------------------------

    def _request_id(self, batch: torch.Tensor) -> str:
        """The same batch always gets the same id, so the server can tell a retry from a new query."""
        digest = hashlib.sha256(f"{self.url}|{self.kind}|{self.binary}|{self.preprocess}|"
                                f"{tuple(batch.shape)}|".encode())
        digest.update(batch.numpy().tobytes())
        return "b2kd-" + digest.hexdigest()[:32]

    def _answers(self, api: torch.Tensor) -> torch.Tensor:
        """The API-form rows of a decoded answer, checked against ``output`` and the kind."""
        source = f"the teacher at {self.url}"
        if self.output == "logits":
            return softmax_of_logits(api, source)
        finite_floats = self.kind.name == "soft" and bool(torch.isfinite(api).all())
        hint = "; a server that answers logits needs teacher.output=logits" if finite_floats else ""
        check(api, self.kind, source, hint)
        return api

    def _infer_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Wire]:
        n = len(batch)
        if self.fixed_batch is not None and n < self.fixed_batch:  # the model takes exactly N images:
            pad = batch[:1].expand(self.fixed_batch - n, *batch.shape[1:])  # pad with the first one
            batch = torch.cat([batch, pad])
        request_id = self._request_id(batch)
        header: dict[str, Any] = {"id": request_id}
        if self.binary:
            header["parameters"] = {"binary_data_output": True}
        if self._name_outputs:
            header["outputs"] = [{"name": name} for name in self.layout.names.values()]
        inputs = [Tensor(self.input_name, self.preprocess(batch), self.binary)]
        body, length = encode(header, "inputs", inputs)
        headers = ({HEADER_LENGTH: str(length), "Content-Type": "application/octet-stream"}
                   if length is not None else {"Content-Type": "application/json"})
        response, wire = self._send("POST", self._model_path + "/infer", body, headers)
        content = response.content
        try:
            msg = decode(content, header_length(response.headers.get(HEADER_LENGTH), len(content)), "outputs")
            if msg.header.get("id", request_id) != request_id:
                raise ProtocolError(f"answer to request '{msg.header.get('id')!s:.80}', not '{request_id}'")
            api = self.layout.from_outputs(msg.tensors, len(batch))
            embeddings = self.layout.embeddings_from_outputs(msg.tensors, len(batch))
        # ProtocolError is what decoding raises; the others would be a decoder's bug, and an
        # answer is untrusted input all the same: one clear line, never a traceback
        except (ValueError, TypeError, LookupError, OverflowError, RecursionError) as exc:
            raise BlackBoxError(f"the teacher at {self.url} sent a malformed answer: {exc}") from None
        if embeddings is not None:
            check_embeddings(embeddings, len(batch), self.embedding_dim, f"the teacher at {self.url}")
            embeddings = embeddings[:n]
        return self._answers(api)[:n], embeddings, wire

    def infer(self, images: torch.Tensor) -> BackendAnswer:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.image_shape:
            raise BlackBoxError(
                f"the teacher accepts uint8 images of shape (N, {', '.join(map(str, self.image_shape))}),"
                f" got {tuple(images.shape)} {images.dtype}"
            )
        images = images.cpu().contiguous()
        rows, vectors, sent, received = [], [], [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            api, embeddings, wire = self._infer_batch(batch)
            rows.append(api)
            vectors.append(embeddings)
            sent += _spread(wire.sent, len(batch))
            received += _spread(wire.received, len(batch))
        return BackendAnswer(responses=torch.cat(rows), bytes_sent=sent, bytes_received=received,
                             embeddings=torch.cat(vectors) if self.embedding_dim else None)
