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
re-sends the same batch. Every wait is bounded, end to end: an attempt (connect,
send, every read) ends after ``timeout`` seconds whatever the server does (a
server dripping a byte a second included), a request after ``max_total_wait``
seconds in all (attempts, waits and reads); an answer larger than
``max_response_mb`` (by default derived from the batch and the classes, with
generous slack) is refused unread. Connection errors and 5xx are retried
``retries`` times with exponential backoff; 429 and 503 wait what a finite
``Retry-After`` asks (at least ``backoff``, at most ``max_wait`` each), and a
request gives up at once when the server asks for longer than it has left.
501 (not implemented) is permanent and not retried. The defaults give up on a
provider that never answers within :func:`longest_wait_s` (about two minutes).

A binary request refused (4xx/5xx other than key, quota, rate or size) before any
binary answer came back is tried once as JSON; if that works the run goes on in
JSON, with a warning. An answer whose id is not the request's is accepted with a
warning while the order is unambiguous (one request of this client in flight, the
id none of its other requests'), else refused. A 402 that says how much of the
quota is left (b2kd's does) carries it, so the last request can shrink to it.
Bytes are counted as they travel, bodies only: every attempt that reached the
server counts, and each batch's total is spread over its images.
"""

from __future__ import annotations

import email.utils
import hashlib
import ipaddress
import json
import logging
import math
import random
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

import httpcore
import httpx
import torch

from b2kd.blackbox.base import (
    BackendAnswer,
    BlackBoxError,
    Provider,
    QuotaExceeded,
    Refused,
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
from b2kd.blackbox.validate import check, check_embeddings, softmax_of_logits
from b2kd.edge.preprocess import INPUT_DTYPES, Preprocess, PreprocessError

if TYPE_CHECKING:
    from b2kd.core.config import TeacherConfig

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
#: Statuses of a binary request that a JSON one would get all the same (key, quota, model, rate,
#: size, request id, busy): not tried again as JSON.
NOT_FORMAT = (401, 402, 403, 404, 408, 409, 413, 429, 503)
#: The longest wait for ``/v2/models/NAME/config``: optional (a batch-size hint), never retried.
CONFIG_PROBE_S = 10.0
#: Model metadata and config are small: a larger body is no metadata.
METADATA_LIMIT = 8 << 20
#: Of an error answer (4xx/5xx) only the start is read, for its message.
ERROR_LIMIT = 64 << 10
#: The derived answer limit: per value (a JSON float takes at most about 25 characters) and per answer.
BYTES_PER_VALUE, ANSWER_SLACK = 64, 1 << 20
_QUOTA_USED = re.compile(r"(\d+) of (\d+) queries used")


def longest_wait_s(teacher: TeacherConfig) -> float:
    """The longest a run waits on a teacher that never answers usefully, from its settings: the
    model config's probe, then one request's whole bound (attempts, waits and reads included)."""
    return min(teacher.timeout_s, CONFIG_PROBE_S) + teacher.max_total_wait_s


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


def one_line(text: str, limit: int = 200) -> str:
    """Server-sent text fit for one line of an error: printable, whitespace collapsed, cut."""
    text = "".join(c if c.isprintable() else " " for c in text[: limit * 4])
    return " ".join(text.split())[:limit]


@dataclass
class Reply:
    """A response read within its bounds: status, headers and body (an error's: its start)."""

    status: int
    headers: httpx.Headers
    content: bytes
    reason: str = ""


def _server_message(reply: Reply) -> str:
    try:
        error = json.loads(reply.content).get("error")
    except (ValueError, AttributeError, RecursionError):
        error = None
    text = str(error) if error else reply.content[:4096].decode("utf-8", "replace")
    return one_line(text) or reply.reason


def quota_left(message: str) -> int | None:
    """Queries left of a key's quota, as a 402's message states them ('U of Q queries used',
    b2kd's); None when it does not say."""
    match = _QUOTA_USED.search(message)
    return max(int(match[2]) - int(match[1]), 0) if match else None


@dataclass
class Wire:
    """Body bytes that went each way for one request, retries included."""

    sent: int = 0
    received: int = 0


class _FormatRefused(Exception):
    """A binary request refused in a way a JSON one might not be (see :data:`NOT_FORMAT`)."""

    def __init__(self, problem: str, wire: Wire):
        super().__init__(problem)
        self.wire = wire


class _Deadline(threading.local):
    """When the current attempt must end (per thread: one client may serve several)."""

    at: float | None = None

    def bound(self, timeout: float | None, error: type[Exception]) -> float | None:
        """``timeout`` cut to what is left of the attempt; ``error`` once nothing is left."""
        if self.at is None:
            return timeout
        left = self.at - time.monotonic()
        if left <= 0:
            raise error("the attempt's time is up")
        return left if timeout is None else min(timeout, left)


class _BoundedStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the attempt's deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: _Deadline):
        self._stream, self._deadline = stream, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._deadline.bound(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._deadline.bound(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname,
                                     self._deadline.bound(timeout, httpcore.ConnectTimeout))
        return _BoundedStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _BoundedBackend(httpcore.NetworkBackend):
    """httpcore's network backend with every connect, read and write cut to the deadline."""

    def __init__(self, backend: httpcore.NetworkBackend, deadline: _Deadline):
        self._backend, self._deadline = backend, deadline

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None, socket_options=None) -> httpcore.NetworkStream:
        bound = self._deadline.bound(timeout, httpcore.ConnectTimeout)
        stream = self._backend.connect_tcp(host, port, bound, local_address, socket_options)
        return _BoundedStream(stream, self._deadline)

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options=None) -> httpcore.NetworkStream:
        bound = self._deadline.bound(timeout, httpcore.ConnectTimeout)
        return _BoundedStream(self._backend.connect_unix_socket(path, bound, socket_options), self._deadline)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def bound_every_read(client: httpx.Client, deadline: _Deadline) -> None:
    """Make every connect, read and write of ``client`` end by ``deadline.at``.

    httpx's timeout bounds each read, not a request: a server dripping a byte a second holds
    a client forever. httpcore's connection pools take a network backend, which httpx does
    not let one pass; it is set here on the pool of each of the client's transports (the
    proxies httpx found in the environment included).
    """
    transports = [client._transport, *(t for t in client._mounts.values() if t is not None)]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if not isinstance(getattr(pool, "_network_backend", None), httpcore.NetworkBackend):
            raise BlackBoxError(f"httpx {httpx.__version__} builds its connections in a way b2kd cannot"
                                " bound in time (b2kd is tested with httpx 0.29)")
        pool._network_backend = _BoundedBackend(pool._network_backend, deadline)


def input_shape_ok(shape: Any) -> bool:
    """Whether ``shape`` is [-1, C, H, W] or [N, C, H, W] with positive sizes."""
    return (isinstance(shape, list) and len(shape) == 4
            and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            and min(shape[1:]) >= 1 and (shape[0] == -1 or shape[0] >= 1))


@dataclass(frozen=True)
class InputOverride:
    """The image input as the user states it (``teacher.input_name``, ``input_datatype``,
    ``input_shape``), for a server whose metadata lists no input, several, or a wrong one."""

    name: str | None = None
    datatype: str | None = None
    shape: list[int] | None = None  # [N, C, H, W], N = -1 for any batch

    @property
    def complete(self) -> bool:
        return self.name is not None and self.datatype is not None and self.shape is not None

    @classmethod
    def checked(cls, name: str | None, datatype: str | None, shape: list[int] | None) -> InputOverride:
        if name is not None and (not isinstance(name, str) or not name):
            raise BlackBoxError("teacher.input_name must be a non-empty string")
        if datatype is not None and datatype not in INPUT_DTYPES:
            raise BlackBoxError(f"teacher.input_datatype must be one of {', '.join(INPUT_DTYPES)},"
                                f" not {datatype!r:.40}")
        if shape is not None:
            if isinstance(shape, (list, tuple)):
                shape = [-1, *shape] if len(shape) == 3 else list(shape)
            if not input_shape_ok(shape):
                raise BlackBoxError(f"teacher.input_shape must be [C, H, W] or [N, C, H, W] (N = -1:"
                                    f" any batch) with positive sizes, not {shape!r:.80}")
        return cls(name, datatype, shape)


class HTTPTeacher:
    """A teacher behind an Open Inference Protocol server: ``infer(uint8 images) -> BackendAnswer``.

    ``input_preset`` / ``input_scale`` / ``input_mean`` / ``input_std`` say how
    pixels become a float model's inputs (b2kd.edge.preprocess); ``output``
    is ``probabilities`` or ``logits`` (turned into probabilities by a softmax).
    ``timeout`` bounds an attempt, ``max_total_wait`` a request (see the module's
    docstring); ``allow_mixed_providers`` is carried for the budgeted teacher
    (b2kd.edge.teacher), which refuses a ledger of another provider's answers without it.
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
        max_total_wait: float = 120.0,
        max_response_mb: float | None = None,
        allow_mixed_providers: bool = False,
        num_classes: int | None = None,
        output: str = "probabilities",
        input_preset: str | None = None,
        input_scale: float | None = None,
        input_mean: list[float] | None = None,
        input_std: list[float] | None = None,
        embedding_output: str | None = None,
        input_name: str | None = None,
        input_datatype: str | None = None,
        input_shape: list[int] | None = None,
    ):
        root, self._model_path = split_url(url)
        self._stated_input = InputOverride.checked(input_name, input_datatype, input_shape)
        self._embedding_output = embedding_output
        self.url = root + self._model_path
        if output not in OUTPUTS:
            raise BlackBoxError(f"teacher.output must be one of {', '.join(OUTPUTS)}, not {output!r}")
        self.binary, self.output = binary, output
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.max_wait, self.max_total_wait = max_wait, max_total_wait
        self.max_response_mb, self.allow_mixed_providers = max_response_mb, allow_mixed_providers
        self._deadline = _Deadline()
        self._binary_ok = False  # a binary answer came back: a later refusal is no format's
        self._lock = threading.Lock()
        self._in_flight: set[str] = set()
        self._answered: deque[str] = deque(maxlen=256)  # ids of this client's earlier requests
        self._id_warned = False
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        exposed = key_exposure(root, api_key)
        if exposed:
            log.warning("%s", exposed)
        self._client = httpx.Client(base_url=root, timeout=timeout, headers=headers)
        try:
            bound_every_read(self._client, self._deadline)
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
            "max_total_wait": teacher.max_total_wait_s, "max_response_mb": teacher.max_response_mb,
            "allow_mixed_providers": teacher.allow_mixed_providers, "output": teacher.output,
            "input_preset": teacher.input_preset, "input_scale": teacher.input_scale,
            "input_mean": teacher.input_mean, "input_std": teacher.input_std,
            "embedding_output": teacher.embedding_output, "input_name": teacher.input_name,
            "input_datatype": teacher.input_datatype, "input_shape": teacher.input_shape,
        }
        return cls(teacher.url, teacher.api_key, **{**settings, **overrides})

    def _open(self, batch_size: int, num_classes: int | None, preset, scale, mean, std) -> None:
        """Read the model's metadata (and config) and settle how images go and answers come back."""
        response, _ = self._send("GET", self._model_path, limit=METADATA_LIMIT)
        what = f"the teacher at {self.url}"
        try:
            meta = parse_json(response.content, "model metadata")
            self.input_name, datatype, self.fixed_batch, self.image_shape = self._input_spec(
                meta, self._stated_input)
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
        self.provider = self._provider(meta)
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
    def _input_spec(meta: dict[str, Any], stated: InputOverride
                    ) -> tuple[str, str, int | None, tuple[int, int, int]]:
        """(name, datatype, fixed batch size or None, (C, H, W)) of the one image input: the
        metadata's, with each of the user's ``teacher.input_*`` settings taking precedence."""
        inputs = meta.get("inputs")
        listed = [i for i in inputs if isinstance(i, dict)] if isinstance(inputs, list) else []
        if stated.name is not None and len(listed) > 1:
            listed = [i for i in listed if i.get("name") == stated.name]
        if len(listed) == 1:
            spec = listed[0]
        elif stated.complete:
            spec = {}
        else:
            count = len(inputs) if isinstance(inputs, list) else "no"
            raise ProtocolError(f"b2kd sends one input of images; the model must take exactly one, and its"
                                f" metadata lists {count} inputs; name it with teacher.input_name,"
                                " teacher.input_datatype and teacher.input_shape")
        name = stated.name if stated.name is not None else spec["name"]
        datatype = stated.datatype if stated.datatype is not None else spec["datatype"]
        shape = stated.shape if stated.shape is not None else spec["shape"]
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise ProtocolError("the input's name and datatype must be strings")
        if not input_shape_ok(shape):
            raise ProtocolError(f"the input must have shape [-1, C, H, W] or [N, C, H, W], not {shape!r:.80}")
        return name, datatype, None if shape[0] == -1 else shape[0], (shape[1], shape[2], shape[3])

    def _provider(self, meta: dict[str, Any]) -> Provider:
        """Who answers: this URL, the model's name and version as its metadata states them (the
        URL's version when it names one), the response kind."""
        match = re.search(r"/versions/([^/]+)$", self._model_path)
        versions = meta.get("versions")
        if match:
            version = match[1]
        elif isinstance(versions, list):
            version = ",".join(str(v) for v in versions[:8])
        else:
            version = ""
        name = meta.get("name")
        return Provider(self.url, one_line(str(name)) if name is not None else "", one_line(version),
                        str(self.kind))

    def _config_max_batch(self) -> int | None:
        """``max_batch_size`` from ``/v2/models/NAME/config`` (Triton states it there), or None.

        One attempt of at most CONFIG_PROBE_S: a server without the endpoint (404), or any
        failure, means no limit is known.
        """
        deadline = time.monotonic() + min(self.timeout, CONFIG_PROBE_S)
        try:
            reply, _ = self._attempt("GET", self._model_path + "/config", None, None, METADATA_LIMIT,
                                     Wire(), deadline)
            if reply is None or reply.status != 200:
                return None
            value = parse_json(reply.content, "model config").get("max_batch_size")
        except (BlackBoxError, ProtocolError):
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- one request, with retries ---------------------------------------------------------

    def _refusal(self, reply: Reply) -> TeacherRefused:
        message, status = _server_message(reply), reply.status
        if status == 402:
            return QuotaExceeded(f"the teacher's query quota for this API key is spent: {message}",
                                 quota_left(message))
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

    def _read(self, response: httpx.Response, limit: int) -> bytes:
        """The body, refused past ``limit`` bytes (an error's: its start, for the message)."""
        error = response.status_code >= 400
        cap = min(limit, ERROR_LIMIT) if error else limit
        declared = response.headers.get("content-length", "").strip()
        if not error and declared.isdigit() and int(declared) > cap:
            raise self._too_large(cap)
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                if error:
                    break
                raise self._too_large(cap)
        return b"".join(chunks)[:cap]

    def _too_large(self, cap: int) -> BlackBoxError:
        setting = (f"teacher.max_response_mb = {self.max_response_mb:g}" if self.max_response_mb is not None
                   else "derived from the batch and the classes; raise it with teacher.max_response_mb")
        return BlackBoxError(f"the teacher at {self.url} sent an answer of more than {cap / 2**20:.3g} MB"
                             f" ({setting}); refused")

    def _attempt(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None,
                 limit: int, wire: Wire, deadline: float) -> tuple[Reply | None, str]:
        """One try, over by ``deadline`` whatever the server does: (reply, '') or (None, the problem)."""
        size, response, began = len(body or b""), None, time.monotonic()
        self._deadline.at = deadline
        try:
            with self._client.stream(method, path, content=body, headers=headers) as response:
                wire.sent += size
                try:
                    content = self._read(response, limit)
                finally:
                    wire.received += response.num_bytes_downloaded
                return Reply(response.status_code, response.headers, content, response.reason_phrase), ""
        except httpx.DecodingError as exc:  # a body its Content-Encoding does not decode
            malformed = BlackBoxError(f"the teacher at {self.url} sent a malformed answer:"
                                      f" {one_line(str(exc))}")
            malformed.refused = Refused(0, wire.sent, wire.received)
            raise malformed from None
        except httpx.TransportError as exc:
            if response is None and not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                wire.sent += size  # sent, then the answer was lost
            if time.monotonic() >= deadline:
                return None, (f"no complete answer within {deadline - began:.3g} s (an attempt ends after"
                              f" teacher.timeout_s = {self.timeout:g} s)")
            if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):  # nothing left this machine
                return None, f"cannot connect ({one_line(str(exc))})"
            return None, f"{type(exc).__name__} ({one_line(str(exc))})"
        except BlackBoxError as exc:  # too large: what arrived is counted, then refused
            exc.refused = Refused(0, wire.sent, wire.received)
            raise
        finally:
            self._deadline.at = None

    def _send(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None, *, limit: int,
              format_try: bool = False) -> tuple[Reply, Wire]:
        """One request, retried within its bounds: (reply, bytes each way). ``format_try``: a
        refusal a JSON request might not get raises _FormatRefused instead."""
        wire, failures, refusals, attempts = Wire(), 0, 0, 0
        start = time.monotonic()
        while True:
            attempts += 1
            deadline = min(time.monotonic() + self.timeout, start + self.max_total_wait)
            reply, problem = self._attempt(method, path, body, headers, limit, wire, deadline)
            asked = None
            if reply is not None:
                if reply.status < 400:
                    return reply, wire
                self._refuse_now(reply, wire, format_try)
                asked = retry_after(reply)
                problem = f"HTTP {reply.status} ({_server_message(reply)})"
                if reply.status == 429:
                    problem = f"HTTP 429 (rate limit: {_server_message(reply)})"
            if reply is not None and reply.status == 429:
                refusals += 1
                attempt = refusals
            else:
                failures += 1
                attempt = failures
                if failures > self.retries:
                    raise TeacherUnavailable(f"the teacher at {self.url} failed {failures} times in a row"
                                             f" (teacher.retries = {self.retries}); last: {problem}")
            time.sleep(self._next_wait(asked, attempt, start, attempts, problem))

    def _refuse_now(self, reply: Reply, wire: Wire, format_try: bool) -> None:
        """Raise for a status no retry can change (and, on a format try, one JSON might)."""
        status = reply.status
        if format_try and status not in NOT_FORMAT:
            raise _FormatRefused(f"HTTP {status}: {_server_message(reply)}", wire)
        if (status < 500 and status != 429) or status in PERMANENT:
            raise self._refusal(reply)

    def _next_wait(self, asked: float | None, attempt: int, start: float, attempts: int,
                   problem: str) -> float:
        """Seconds before the next attempt, or TeacherUnavailable when they would end past
        ``max_total_wait`` (at once when the server asks for longer than that)."""
        elapsed = time.monotonic() - start
        honoured = asked is not None and asked >= self.backoff  # else the backoff is waited
        if honoured and elapsed + asked > self.max_total_wait:
            raise TeacherUnavailable(
                f"the teacher at {self.url} answered {problem} and asks to wait {asked:.0f} s"
                f" (Retry-After), more than teacher.max_total_wait_s = {self.max_total_wait:g} s"
                " allows; try again later")
        wait = self._wait(asked, attempt)
        if elapsed + wait >= self.max_total_wait:
            raise TeacherUnavailable(
                f"the teacher at {self.url} did not answer within teacher.max_total_wait_s ="
                f" {self.max_total_wait:g} s: gave up after {elapsed:.3g} s and {attempts} attempts (each"
                f" at most teacher.timeout_s = {self.timeout:g} s); last: {problem}")
        return wait

    def without_embedding(self) -> None:
        """Read only the probabilities (or labels) of a gray-box server: the embedding is
        neither asked for nor paid for in bytes."""
        self.layout = self.layout.without_embedding()
        self.kind, self.embedding_dim = self.layout.kind, None

    # --- the backend interface -------------------------------------------------------------

    def _request_id(self, batch: torch.Tensor, binary: bool) -> str:
        """The same batch always gets the same id, so the server can tell a retry from a new query."""
        digest = hashlib.sha256(f"{self.url}|{self.kind}|{binary}|{self.preprocess}|"
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

    @contextmanager
    def _flight(self, request_id: str) -> Iterator[None]:
        """Mark a request in flight while it is (the id check tells its answer from others')."""
        with self._lock:
            self._in_flight.add(request_id)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight.discard(request_id)
                self._answered.append(request_id)

    def _check_id(self, answered: object, request_id: str) -> None:
        """Accept an answer whose id is not its request's while the order is unambiguous (no other
        request of this client in flight, the id none of its other requests'), with a warning."""
        if answered is None or answered == request_id:
            return
        shown = one_line(str(answered), 80)
        with self._lock:
            ours = answered in self._in_flight or answered in self._answered
            others = len(self._in_flight)
        if ours or others:
            why = "another request of this client" if ours else f"one of {others + 1} requests in flight"
            raise ProtocolError(f"answer to request '{shown}', not '{request_id}': it may be {why}'s")
        if not self._id_warned:
            self._id_warned = True
            log.warning("warning: the teacher at %s answers with ids it was not sent ('%s' to '%s');"
                        " accepted, as one request was in flight", self.url, shown, request_id)

    def _post_as(self, batch: torch.Tensor, binary: bool, format_try: bool) -> tuple[Reply, Wire, str]:
        """Send one inference request (binary tensors or JSON lists): (reply, bytes, request id)."""
        request_id = self._request_id(batch, binary)
        header: dict[str, Any] = {"id": request_id}
        if binary:
            header["parameters"] = {"binary_data_output": True}
        if self._name_outputs:
            header["outputs"] = [{"name": name} for name in self.layout.names.values()]
        body, length = encode(header, "inputs", [Tensor(self.input_name, self.preprocess(batch), binary)])
        headers = ({HEADER_LENGTH: str(length), "Content-Type": "application/octet-stream"}
                   if length is not None else {"Content-Type": "application/json"})
        with self._flight(request_id):
            reply, wire = self._send("POST", self._model_path + "/infer", body, headers,
                                     limit=self._answer_limit(len(batch)), format_try=format_try)
        return reply, wire, request_id

    def _answer_limit(self, rows: int) -> int:
        """The largest answer taken: teacher.max_response_mb, or a JSON answer of ``rows`` rows many
        times over (every value at BYTES_PER_VALUE bytes, plus ANSWER_SLACK)."""
        if self.max_response_mb is not None:
            return int(self.max_response_mb * 2**20)
        return ANSWER_SLACK + rows * (self.num_classes + (self.embedding_dim or 0)) * BYTES_PER_VALUE

    def _post(self, batch: torch.Tensor) -> tuple[Reply, Wire, str]:
        """Send one batch as ``binary`` says; a binary request refused before any binary answer came
        back is tried once as JSON, and the run goes on in JSON if that works."""
        if not self.binary or self._binary_ok:
            return self._post_as(batch, self.binary, format_try=False)
        try:
            found = self._post_as(batch, True, format_try=True)
        except _FormatRefused as refused:
            reply, wire, request_id = self._post_as(batch, False, format_try=False)
            wire.sent += refused.wire.sent
            wire.received += refused.wire.received
            self.binary = False
            log.warning("warning: the teacher at %s refused binary tensors (%s) and answered JSON: the run"
                        " goes on in JSON (larger bodies); teacher.binary=false skips the binary try",
                        self.url, refused)
            return reply, wire, request_id
        self._binary_ok = True
        return found

    def _read_answer(self, reply: Reply, request_id: str,
                     rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(API-form rows, embeddings or None) of an answer, or one clear line saying what is wrong."""
        content, source = reply.content, f"the teacher at {self.url}"
        try:
            msg = decode(content, header_length(reply.headers.get(HEADER_LENGTH), len(content)), "outputs")
            self._check_id(msg.header.get("id"), request_id)
            api = self.layout.from_outputs(msg.tensors, rows)
            embeddings = self.layout.embeddings_from_outputs(msg.tensors, rows)
        # ProtocolError is what decoding raises; the others would be a decoder's bug, and an
        # answer is untrusted input all the same: one clear line, never a traceback
        except (ValueError, TypeError, LookupError, OverflowError, RecursionError) as exc:
            ctype = one_line(reply.headers.get("content-type", ""), 60)
            body = f" (a {ctype} body)" if ctype and not ctype.startswith(("application/", "binary/")) else ""
            raise BlackBoxError(f"{source} sent a malformed answer{body}:"
                                f" {one_line(str(exc), 300)}") from None
        if embeddings is not None:
            check_embeddings(embeddings, rows, self.embedding_dim, source)
        return self._answers(api), embeddings

    def _infer_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, Wire]:
        n = len(batch)
        if self.fixed_batch is not None and n < self.fixed_batch:  # the model takes exactly N images:
            pad = batch[:1].expand(self.fixed_batch - n, *batch.shape[1:])  # pad with the first one
            batch = torch.cat([batch, pad])
        try:
            reply, wire, request_id = self._post(batch)
        except BlackBoxError as exc:  # an answer too large or undecodable: counted for n images
            if exc.refused is not None:
                exc.refused = replace(exc.refused, images=n)
            raise
        try:
            api, embeddings = self._read_answer(reply, request_id, len(batch))
        except BlackBoxError as exc:  # received and refused: the ledger counts it
            exc.refused = Refused(n, wire.sent, wire.received)
            raise
        return api[:n], None if embeddings is None else embeddings[:n], wire

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
