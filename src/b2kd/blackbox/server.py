"""A teacher served over the Open Inference Protocol (KServe v2 REST), as a paid API would be.

``create_app`` wraps an in-process backend (its response kind is the
provider's choice) in a FastAPI app with the protocol's endpoints plus what a
paid API needs: API keys with quotas (:mod:`b2kd.blackbox.store`), a per-key
rate limit (429 + ``Retry-After``), limits on batch and body size (413),
idempotent request ids, a JSON-lines access log and ``/metrics``.

Every refusal is a 4xx with ``{"error": "..."}``; the checks run cheapest
first (model, key, rate, size) so that hostile traffic costs little.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from b2kd import __version__
from b2kd.blackbox.local import LocalBackend
from b2kd.blackbox.metrics import Metrics
from b2kd.blackbox.protocol import (
    HEADER_LENGTH,
    MAX_ID_LENGTH,
    Layout,
    ProtocolError,
    Tensor,
    decode,
    encode,
    header_length,
)
from b2kd.blackbox.store import ANONYMOUS, QuotaExhausted, QuotaStore, RequestIdReused, key_id

VERSION = "1"
INPUT = "images"


@dataclass
class ServerSettings:
    """What the provider decides: name, keys and quotas, rate and size limits, where state lives."""

    model_name: str = "teacher"
    api_keys: dict[str, int | None] = field(default_factory=dict)  # key -> quota (None: unlimited)
    rate_limit: float | None = None  # requests per second per key
    burst: int = 10  # requests a key may send at once before the rate applies
    max_batch: int = 1024  # images per request
    max_body_bytes: int | None = None  # None: what max_batch images take as JSON, plus 64 KiB
    state: str | Path = ":memory:"  # SQLite file of quotas and paid answers
    access_log: str | Path | None = None  # JSON lines, one per request


class Refusal(Exception):
    """A request answered with a 4xx: status, message, reason (a metrics label), headers."""

    def __init__(self, status: int, message: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


class RateLimiter:
    """A token bucket per key: ``burst`` requests at once, then ``rate`` per second."""

    def __init__(self, rate: float | None, burst: int):
        self.rate, self.burst = rate, max(burst, 1)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def wait(self, kid: str) -> float:
        """0 and a token taken, or the seconds until a token is available."""
        if self.rate is None:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(kid, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[kid] = (tokens - 1, now)
                return 0.0
            self._buckets[kid] = (tokens, now)
            return (1 - tokens) / self.rate


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class AccessLog:
    """One JSON object per request, appended to ``path`` (nothing is written when it is None).

    The file is opened for each record (microseconds), so a rotated log needs no reopen signal.
    """

    def __init__(self, path: str | Path | None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self._lock, self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


class ServedModel:
    """The inference path proper, run in a worker thread: decode, check, charge, answer."""

    def __init__(self, backend: LocalBackend, settings: ServerSettings, store: QuotaStore):
        self.backend, self.settings, self.store = backend, settings, store
        self.layout = Layout.of(backend.kind, backend.num_classes)
        self.pixels = math.prod(backend.image_shape)
        self._model_lock = threading.Lock()  # one forward at a time: torch's threads do the rest

    def metadata(self) -> dict:
        return {
            "name": self.settings.model_name,
            "versions": [VERSION],
            "platform": "pytorch",
            "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, *self.backend.image_shape]}],
            "outputs": self.layout.metadata(),
            "parameters": {"response": str(self.backend.kind), "num_classes": self.backend.num_classes,
                           "max_batch_size": self.settings.max_batch},
        }

    def _images(self, tensors: dict[str, np.ndarray]) -> torch.Tensor:
        if set(tensors) != {INPUT}:
            raise ProtocolError(f"this model takes one input, '{INPUT}'; got {sorted(tensors)}")
        images = tensors[INPUT]
        shape = (-1, *self.backend.image_shape)
        if images.dtype != np.uint8:
            raise ProtocolError(f"input '{INPUT}' must be UINT8 (images, 1 byte per pixel)")
        if images.ndim != 4 or tuple(images.shape[1:]) != shape[1:] or len(images) == 0:
            raise ProtocolError(f"input '{INPUT}' must have shape {list(shape)}, got {list(images.shape)}")
        return torch.from_numpy(images.copy())

    def _outputs(self, header: dict) -> list[tuple[str, bool]]:
        """(output name, as binary) for each output the request asks for."""
        params = header.get("parameters", {})
        if not isinstance(params, dict) or not isinstance(params.get("binary_data_output", False), bool):
            raise ProtocolError("parameters must be an object and binary_data_output a boolean")
        default = params.get("binary_data_output", False)
        known = list(self.layout.names.values())
        wanted = header.get("outputs")
        if wanted is None:
            return [(name, default) for name in known]
        if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
            raise ProtocolError("outputs must be a list of objects")
        chosen = []
        for o in wanted:
            p = o.get("parameters", {})
            binary = p.get("binary_data", default) if isinstance(p, dict) else None
            if o.get("name") not in known or not isinstance(binary, bool):
                raise ProtocolError(f"unknown output {o.get('name')!r:.60} (outputs: {', '.join(known)})"
                                    " or a binary_data parameter that is not a boolean")
            chosen.append((o["name"], binary))
        return chosen

    def answer(self, kid: str, body: bytes, raw_length: str | None) -> tuple[bytes, int | None, int, bool]:
        """(body, header length, images, replayed) of the answer to one request body."""
        try:  # max_elements: a request of at most max_batch images, refused (413) before allocating
            msg = decode(body, header_length(raw_length, len(body)), "inputs",
                         max_elements=self.settings.max_batch * self.pixels)
            request_id = msg.header.get("id")
            if request_id is not None and (not isinstance(request_id, str)
                                           or not 0 < len(request_id) <= MAX_ID_LENGTH):
                raise ProtocolError(f"id must be a string of 1 to {MAX_ID_LENGTH} characters")
            images = self._images(msg.tensors)
            outputs = self._outputs(msg.header)
        except ProtocolError as exc:
            if exc.status == 413:
                raise Refusal(413, f"{exc}; this server takes at most {self.settings.max_batch} images"
                              " per request", "too_large") from None
            raise Refusal(exc.status, str(exc), "bad_request") from None
        record_id = (None if request_id is None
                     else f"{self.settings.model_name}/{self.backend.kind}/{request_id}")
        digest = hashlib.sha256(body).hexdigest()
        try:
            stored = self.store.replay(kid, record_id, digest)
            if stored is None:
                self.store.ensure_affordable(kid, len(images))  # refuse before computing
                with self._model_lock:
                    api = self.backend.infer(images).responses
                arrays = self.layout.to_outputs(api)
                header = {"model_name": self.settings.model_name, "model_version": VERSION}
                if request_id is not None:
                    header["id"] = request_id
                out, length = encode(header, "outputs",
                                     [Tensor(name, arrays[name], binary) for name, binary in outputs])
                stored = self.store.charge(kid, record_id, digest, len(images), out, length)
        except QuotaExhausted as exc:
            raise Refusal(402, str(exc), "quota") from None
        except RequestIdReused as exc:
            raise Refusal(409, str(exc), "id_reused") from None
        return stored.body, stored.header_length, len(images), stored.replayed


def create_app(backend: LocalBackend, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``backend`` under ``settings`` (see the module docstring)."""
    settings = settings or ServerSettings()
    keys = {key_id(k) for k in settings.api_keys}
    store = QuotaStore(settings.state, {key_id(k): q for k, q in settings.api_keys.items()})
    metrics = Metrics()
    served = ServedModel(backend, settings, store)
    limiter = RateLimiter(settings.rate_limit, settings.burst)
    max_body = settings.max_body_bytes or settings.max_batch * served.pixels * 4 + 65536
    access = AccessLog(settings.access_log)
    name = settings.model_name

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        store.close()

    app = FastAPI(title="b2kd teacher", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.metrics, app.state.settings = store, metrics, settings

    @app.exception_handler(Refusal)
    async def _refused(request: Request, exc: Refusal) -> JSONResponse:
        metrics.inc("b2kd_refusals_total", reason=exc.reason)
        request.state.log["error"] = str(exc)
        return _error(exc.status, str(exc), exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.middleware("http")
    async def _log(request: Request, call_next):
        start = time.perf_counter()
        request.state.log = {}
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            metrics.inc("b2kd_http_requests_total", endpoint=endpoint, status=str(status))
            access.write({
                "time": round(time.time(), 3), "method": request.method, "path": request.url.path,
                "status": status, "ms": round(1000 * (time.perf_counter() - start), 2),
                "client": request.client.host if request.client else None, **request.state.log,
            })

    def model_or_404(model: str, version: str = VERSION) -> None:
        if model != name or version != VERSION:
            raise Refusal(404, f"unknown model '{model}' version '{version}'; this server has"
                          f" '{name}' version '{VERSION}'", "unknown_model")

    def authenticate(request: Request) -> str:
        if not keys:
            return ANONYMOUS
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not token.strip():
            raise Refusal(401, "missing API key: send the header 'Authorization: Bearer KEY'", "auth",
                          challenge)
        kid = key_id(token.strip())
        if kid not in keys:
            raise Refusal(401, "unknown API key", "auth", challenge)
        return kid

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise Refusal(413, f"request body of {declared} bytes; at most {max_body}", "too_large")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body:
                    raise Refusal(413, f"request body over {max_body} bytes", "too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise Refusal(400, "the request body was cut short", "bad_request") from None
        return b"".join(chunks)

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "b2kd", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str = VERSION) -> dict:
        model_or_404(model, version)
        return served.metadata()

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = VERSION) -> dict:
        model_or_404(model, version)
        return {"name": name, "ready": True}

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(request: Request, model: str, version: str = VERSION) -> Response:
        start = time.perf_counter()
        model_or_404(model, version)
        kid = authenticate(request)
        request.state.log["key"] = kid
        wait = limiter.wait(kid)
        if wait > 0:
            raise Refusal(429, f"rate limit of {settings.rate_limit:g} requests/s exceeded;"
                          f" retry in {wait:.2f} s", "rate_limit", {"Retry-After": str(math.ceil(wait))})
        body = await read_body(request)
        metrics.inc("b2kd_request_bytes_total", len(body))
        out, length, n, replayed = await run_in_threadpool(
            served.answer, kid, body, request.headers.get(HEADER_LENGTH))
        metrics.inc("b2kd_replayed_queries_total" if replayed else "b2kd_queries_total", n, key=kid)
        metrics.inc("b2kd_response_bytes_total", len(out))
        metrics.observe_latency(time.perf_counter() - start)
        request.state.log.update(queries=n, replayed=replayed, bytes_in=len(body), bytes_out=len(out))
        if length is None:
            return Response(out, media_type="application/json")
        return Response(out, media_type="application/octet-stream", headers={HEADER_LENGTH: str(length)})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(store.usage()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app

