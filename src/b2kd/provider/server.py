"""A teacher served over the Open Inference Protocol (KServe v2 REST), as a paid API would be.

``create_app`` wraps an in-process backend (its response kind is the
provider's choice) in a FastAPI app with the protocol's endpoints, Triton's
model configuration and inference statistics, plus what a paid API needs: API
keys with quotas (:mod:`b2kd.provider.store`), a per-key rate limit (429 +
``Retry-After``), a limit on failed authentications per client address,
limits on batch and body size (413, counted after gzip/deflate decompression),
a body read timeout (408), idempotent request ids, a JSON-lines access log
written off the event loop and ``/metrics`` (optionally behind a key).

Every refusal is a 4xx with ``{"error": "..."}``; the checks run cheapest
first (model, key, rate, size) so that hostile traffic costs little. Queries
are reserved before the model runs and refunded if it fails, so concurrent
requests never compute beyond a key's quota.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from b2kd import __version__
from b2kd.blackbox.local import LocalBackend
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
from b2kd.provider.access_log import AccessLog
from b2kd.provider.body import BodyError, read_body
from b2kd.provider.keys import KeySetupError, key_id, legacy_key_id, secret_check
from b2kd.provider.metrics import CONTENT_TYPE, Metrics
from b2kd.provider.stats import InferenceStats
from b2kd.provider.store import (
    ANONYMOUS,
    Answer,
    QuotaExhausted,
    RequestIdReused,
    Reservation,
    Store,
    StoreUnavailable,
    open_store,
)

VERSION = "1"
INPUT = "images"
AUTH_FAILURE_RATE = 1.0  # failed authentications per second an address regains after its burst
#: Request head limit (431 beyond): h11 applies its 16 KiB only to a head that arrives in pieces.
MAX_HEAD_BYTES = 16384


@dataclass
class ServerSettings:
    """What the provider decides: name, keys and quotas, limits, where state lives."""

    model_name: str = "teacher"
    api_keys: dict[str, int | None] = field(default_factory=dict)  # key -> quota (None: unlimited)
    rate_limit: float | None = None  # requests per second per key
    burst: int = 10  # requests a key may send at once before the rate applies
    max_batch: int = 1024  # images per request
    max_body_bytes: int | None = None  # None: what max_batch images take as JSON, plus 64 KiB
    state: str | Path = ":memory:"  # SQLite file of quotas and paid answers, or a postgresql:// URL
    access_log: str | Path | None = None  # JSON lines, one per request
    secret: bytes | None = None  # the key-id secret (keys.py); None: a random one, for this app only
    metrics_key: str | None = None  # if set, /metrics and the statistics need 'Bearer METRICS_KEY'
    replay_ttl_s: float = 86400.0  # how long an answered request id is replayed for free
    replay_per_key: int = 10000  # answers kept for replay per key (the oldest go first)
    read_timeout_s: float = 30.0  # for a request's head (connections.py) and for its body
    max_connections: int = 1000  # open connections and requests in flight (503 beyond)
    # connections one client address may hold (503 beyond); None: a quarter of max_connections
    max_connections_per_address: int | None = None
    auth_failures: int = 10  # failed authentications an address may make at once (then 1 per second)
    auth_failure_rate: float = AUTH_FAILURE_RATE  # failed authentications per second regained after that
    # key -> the outputs it may read (a key not named reads them all): a gray-box provider may
    # keep its embedding output to some keys, e.g. {"KEY": ["probabilities"]}
    key_outputs: dict[str, list[str]] = field(default_factory=dict)


class Refusal(Exception):
    """A request answered with a 4xx: status, message, reason (a metrics label), headers."""

    def __init__(self, status: int, message: str, reason: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.headers = status, reason, headers or {}


class RateLimiter:
    """A token bucket per name (key id, client address): ``burst`` at once, then ``rate`` per second."""

    MAX_BUCKETS = 10000  # beyond this, buckets that have refilled are forgotten

    def __init__(self, rate: float | None, burst: int):
        self.rate, self.burst = rate, max(burst, 1)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def wait(self, name: str, take: bool = True) -> float:
        """0 (and a token taken, if ``take``), or the seconds until a token is available."""
        if self.rate is None:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(name, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1:
                if take:
                    self._buckets[name] = (tokens - 1, now)
                    self._prune(now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        if len(self._buckets) > self.MAX_BUCKETS:
            full = [n for n, (t, last) in self._buckets.items() if t + (now - last) * self.rate >= self.burst]
            for name in full:
                del self._buckets[name]


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _triton_tensor(name: str, datatype: str, shape: list[int]) -> dict:
    """A tensor of Triton's model configuration: dims without the batch dimension."""
    entry = {"name": name, "data_type": f"TYPE_{datatype}", "dims": list(shape[1:]) or [1]}
    if len(shape) == 1:  # one value per image: Triton writes dims [1] reshaped to a scalar
        entry["reshape"] = {"shape": []}
    return entry


class ServedModel:
    """The inference path proper, run in a worker thread: decode, check, reserve, compute, settle."""

    def __init__(self, backend: LocalBackend, settings: ServerSettings, store: Store,
                 stats: InferenceStats, on_refund=lambda queries: None):
        self.backend, self.settings, self.store, self.stats = backend, settings, store, stats
        self.on_refund = on_refund
        self.layout = Layout.of(backend.kind, backend.num_classes, backend.embedding_dim)
        self.pixels = math.prod(backend.image_shape)
        self.allowed: dict[str, set[str]] = {}  # key id -> outputs it may read (create_app fills it)
        unknown = {o for outs in settings.key_outputs.values() for o in outs} - set(self.layout.names.values())
        if unknown:
            raise KeySetupError(f"--key-outputs names outputs this model does not have: {sorted(unknown)};"
                             f" it has {', '.join(self.layout.names.values())}")
        self._model_lock = threading.Lock()  # one forward at a time: torch's threads do the rest

    def metadata(self) -> dict:
        return {
            "name": self.settings.model_name,
            "versions": [VERSION],
            "platform": "pytorch",
            "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, *self.backend.image_shape]}],
            "outputs": self.layout.metadata(),
            "parameters": {"response": str(self.backend.kind), "num_classes": self.backend.num_classes,
                           "max_batch_size": self.settings.max_batch,
                           **({"embedding_dim": self.backend.embedding_dim} if self.backend.embedding_dim else {})},
        }

    def config(self) -> dict:
        """The model configuration as Triton gives it (``max_batch_size`` is read from here)."""
        return {
            "name": self.settings.model_name,
            "platform": "pytorch",
            "backend": "b2kd",
            "version_policy": {"specific": {"versions": [int(VERSION)]}},
            "max_batch_size": self.settings.max_batch,
            "input": [{**_triton_tensor(INPUT, "UINT8", [-1, *self.backend.image_shape]),
                       "format": "FORMAT_NCHW"}],
            "output": [_triton_tensor(o["name"], o["datatype"], o["shape"]) for o in self.layout.metadata()],
            "parameters": {"response": {"string_value": str(self.backend.kind)},
                           "num_classes": {"string_value": str(self.backend.num_classes)}},
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

    def _outputs(self, header: dict, kid: str = ANONYMOUS) -> list[tuple[str, bool]]:
        """(output name, as binary) for each output the request asks for (and the key may read)."""
        params = header.get("parameters") or {}  # the v2 spec lets "parameters" be null
        if not isinstance(params, dict) or not isinstance(params.get("binary_data_output", False), bool):
            raise ProtocolError("parameters must be an object and binary_data_output a boolean")
        default = params.get("binary_data_output", False)
        allowed = self.allowed.get(kid)
        known = [n for n in self.layout.names.values() if allowed is None or n in allowed]
        wanted = header.get("outputs")
        if wanted is None:
            return [(name, default) for name in known]
        if not isinstance(wanted, list) or not wanted or not all(isinstance(o, dict) for o in wanted):
            raise ProtocolError("outputs must be a non-empty list of objects")
        forbidden = [o.get("name") for o in wanted
                     if o.get("name") in self.layout.names.values() and o.get("name") not in known]
        if forbidden:
            raise Refusal(403, f"this API key may not read output '{forbidden[0]}' (it may read:"
                          f" {', '.join(known)})", "forbidden_output")
        chosen = []
        for o in wanted:
            p = o.get("parameters") or {}
            binary = p.get("binary_data", default) if isinstance(p, dict) else None
            if o.get("name") not in known or not isinstance(binary, bool):
                raise ProtocolError(f"unknown output {o.get('name')!r:.60} (outputs: {', '.join(known)})"
                                    " or a binary_data parameter that is not a boolean")
            chosen.append((o["name"], binary))
        return chosen

    def _request(self, body: bytes, raw_length: str | None,
                 kid: str = ANONYMOUS) -> tuple[str | None, torch.Tensor, list]:
        """(request id, images, outputs) of a request body, or a 4xx Refusal."""
        try:  # max_elements: a request of at most max_batch images, refused (413) before allocating
            msg = decode(body, header_length(raw_length, len(body)), "inputs",
                         max_elements=self.settings.max_batch * self.pixels)
            request_id = msg.header.get("id")
            if request_id is not None and (not isinstance(request_id, str)
                                           or not 0 < len(request_id) <= MAX_ID_LENGTH):
                raise ProtocolError(f"id must be a string of 1 to {MAX_ID_LENGTH} characters")
            return request_id, self._images(msg.tensors), self._outputs(msg.header, kid)
        except ProtocolError as exc:
            if exc.status == 413:
                raise Refusal(413, f"{exc}; this server takes at most {self.settings.max_batch} images"
                              " per request", "too_large") from None
            raise Refusal(exc.status, str(exc), "bad_request") from None

    def _compute(self, held: Reservation, images: torch.Tensor, outputs: list, request_id: str | None,
                 phases: dict[str, int]) -> Answer:
        """Run the model for a reserved request and settle it; refund it if anything fails."""
        try:
            t = time.perf_counter_ns()
            with self._model_lock:
                phases["queue"] = (t1 := time.perf_counter_ns()) - t
                answer = self.backend.infer(images)
            phases["compute_infer"] = (t2 := time.perf_counter_ns()) - t1
            arrays = self.layout.to_outputs(answer.responses, answer.embeddings)
            header = {"model_name": self.settings.model_name, "model_version": VERSION}
            if request_id is not None:
                header["id"] = request_id
            out, length = encode(header, "outputs",
                                 [Tensor(name, arrays[name], binary) for name, binary in outputs])
            phases["compute_output"] = time.perf_counter_ns() - t2
            return self.store.settle(held, out, length)
        except BaseException:
            try:
                self.store.refund(held)
                self.on_refund(held.queries)
            except StoreUnavailable:
                pass  # the reservation's lease runs out and the store refunds it then
            raise

    def answer(self, kid: str, body: bytes, raw_length: str | None) -> tuple[bytes, int | None, int, bool]:
        """(body, header length, images, replayed) of the answer to one request body."""
        start = time.perf_counter_ns()
        ok, n, replayed, phases = False, 0, False, {}
        try:
            request_id, images, outputs = self._request(body, raw_length, kid)
            n, phases["compute_input"] = len(images), time.perf_counter_ns() - start
            record_id = (None if request_id is None
                         else f"{self.settings.model_name}/{self.backend.kind}/{request_id}")
            digest = hashlib.sha256(body).hexdigest()
            try:
                stored = self.store.replay(kid, record_id, digest)
                if stored is None:
                    held = self.store.reserve(kid, record_id, digest, n)  # before the model runs
                    stored = held if isinstance(held, Answer) else self._compute(
                        held, images, outputs, request_id, phases)
            except QuotaExhausted as exc:
                raise Refusal(402, str(exc), "quota") from None
            except RequestIdReused as exc:
                raise Refusal(409, str(exc), "id_reused") from None
            ok, replayed = True, stored.replayed
            return stored.body, stored.header_length, n, stored.replayed
        finally:
            self.stats.record(ok, time.perf_counter_ns() - start, n, replayed, phases if ok else None)


class Gate:
    """Who may ask: API keys (401 without one), failed authentications per client address (429
    once an address fails too often), and the metrics key for the operator's endpoints."""

    def __init__(self, settings: ServerSettings, secret: bytes):
        self.settings, self.secret = settings, secret
        self.keys = {self.key_id(k) for k in settings.api_keys}
        self.failures = RateLimiter(settings.auth_failure_rate, settings.auth_failures)

    def key_id(self, key: str) -> str:
        return key_id(key, self.secret)

    @staticmethod
    def bearer(request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    def refuse(self, request: Request, message: str) -> None:
        """401, counted against the client's address (429 once it fails too often)."""
        self.failures.wait(request.client.host if request.client else "?")
        raise Refusal(401, message, "auth", {"WWW-Authenticate": "Bearer"})

    def check_failures(self, request: Request) -> None:
        address = request.client.host if request.client else "?"
        wait = self.failures.wait(address, take=False)
        if wait > 0:
            raise Refusal(429, f"too many failed authentications from {address}; retry in {wait:.2f} s",
                          "auth_rate", {"Retry-After": str(math.ceil(wait))})

    def authenticate(self, request: Request) -> str:
        """The key id of the request's API key (ANONYMOUS on a server without keys)."""
        if not self.keys:
            return ANONYMOUS
        self.check_failures(request)
        token = self.bearer(request)
        if token is None:
            self.refuse(request, "missing API key: send the header 'Authorization: Bearer KEY'")
        kid = self.key_id(token)
        if kid not in self.keys:
            self.refuse(request, "unknown API key")
        return kid

    def operator(self, request: Request) -> None:
        """The metrics key, when the server has one (for /metrics and the statistics)."""
        if self.settings.metrics_key is None:
            return
        self.check_failures(request)
        token = self.bearer(request)
        if token is None or not hmac.compare_digest(token.encode(), self.settings.metrics_key.encode()):
            self.refuse(request, "this endpoint needs the metrics key: 'Authorization: Bearer KEY'")


@dataclass
class ServerState:
    """What the app's handlers share: the model, the store, the gate, the limits and the books."""

    settings: ServerSettings
    gate: Gate
    store: Store
    metrics: Metrics
    stats: InferenceStats
    served: ServedModel
    limiter: RateLimiter
    max_body: int
    access: AccessLog

    @classmethod
    def open(cls, backend: LocalBackend, settings: ServerSettings) -> ServerState:
        """Open the store (a wrong secret or URL ends here) and set up what the handlers read."""
        gate = Gate(settings, settings.secret or os.urandom(32))
        store = open_store(settings.state, {gate.key_id(k): q for k, q in settings.api_keys.items()},
                           secret_check=secret_check(gate.secret),
                           legacy_ids={legacy_key_id(k): gate.key_id(k) for k in settings.api_keys},
                           ttl_s=settings.replay_ttl_s, per_key=settings.replay_per_key)
        metrics = Metrics(store.usage, store.records)
        stats = InferenceStats(settings.model_name, VERSION)
        served = ServedModel(backend, settings, store, stats, on_refund=metrics.refunded.inc)
        unknown_keys = set(settings.key_outputs) - set(settings.api_keys)
        if unknown_keys:
            raise KeySetupError(f"--key-outputs names {len(unknown_keys)} key(s) that are not among the API keys")
        served.allowed = {gate.key_id(k): set(outs) for k, outs in settings.key_outputs.items()}
        limiter = RateLimiter(settings.rate_limit, settings.burst)
        max_body = settings.max_body_bytes or settings.max_batch * served.pixels * 4 + 65536
        access = AccessLog(settings.access_log, on_failure=metrics.log_failures.inc)
        return cls(settings, gate, store, metrics, stats, served, limiter, max_body, access)

    def model_or_404(self, model: str, version: str = VERSION) -> None:
        name = self.settings.model_name
        if model != name or version != VERSION:
            raise Refusal(404, f"unknown model '{model}' version '{version}'; this server has"
                          f" '{name}' version '{VERSION}'", "unknown_model")

    def refused_by_server(self, reason: str, record: dict) -> None:
        """A 503 of the connection limits, answered in front of the app (b2kd.provider.connections):
        counted and logged like the app's own answers."""
        try:  # bookkeeping never fails the server
            self.metrics.refusals.labels(reason=reason).inc()
            self.metrics.requests.labels(endpoint="unmatched", status="503").inc()
            self.access.write({"time": round(time.time(), 3), "status": 503, **record})
        except Exception:  # noqa: BLE001
            self.metrics.log_failures.inc()


def create_app(backend: LocalBackend, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``backend`` under ``settings`` (see the module docstring)."""
    p = ServerState.open(backend, settings or ServerSettings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        p.access.start()
        yield
        p.access.stop()
        p.store.close()

    app = FastAPI(title="b2kd teacher", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.metrics, app.state.settings = p.store, p.metrics, p.settings
    app.state.key_id = p.gate.key_id
    app.state.on_refused = p.refused_by_server
    _add_error_handlers(app, p)
    _add_request_log(app, p)
    _add_metadata_routes(app, p)
    _add_inference_route(app, p)
    return app


def _add_error_handlers(app: FastAPI, p: ServerState) -> None:
    """Every refusal a 4xx (or 503, 500) with ``{"error": ...}``, counted by reason."""

    @app.exception_handler(Refusal)
    async def _refused(request: Request, exc: Refusal) -> JSONResponse:
        p.metrics.refusals.labels(reason=exc.reason).inc()
        request.state.log["error"] = str(exc)
        return _error(exc.status, str(exc), exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        p.metrics.refusals.labels(reason="store_unavailable").inc()
        request.state.log["error"] = str(exc)
        return _error(503, "the quota store is unavailable; nothing was charged", {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _failed(_request: Request, exc: Exception) -> JSONResponse:
        # a bug or a failed model: reserved queries were refunded; uvicorn logs the traceback
        return _error(500, f"internal error ({type(exc).__name__}); what was reserved for this request"
                      " was refunded", {"Connection": "close"})

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


def _add_request_log(app: FastAPI, p: ServerState) -> None:
    """Every request: its head's size checked (431), then counted and written to the access log."""

    @app.middleware("http")
    async def _log(request: Request, call_next):
        start = time.perf_counter()
        request.state.log = {}
        status = 500
        try:
            head = len(request.scope.get("raw_path", b""))
            head += sum(len(k) + len(v) for k, v in request.scope["headers"])
            if head > MAX_HEAD_BYTES:
                p.metrics.refusals.labels(reason="too_large").inc()
                response = _error(431, f"request head of {head} bytes; at most {MAX_HEAD_BYTES}",
                                  {"Connection": "close"})
            else:
                response = await call_next(request)
            status = response.status_code
            return response
        finally:
            try:  # bookkeeping never fails a request
                route = request.scope.get("route")
                p.metrics.requests.labels(endpoint=getattr(route, "path", "unmatched"), status=str(status)).inc()
                p.access.write({
                    "time": round(time.time(), 3), "method": request.method, "path": request.url.path,
                    "status": status, "ms": round(1000 * (time.perf_counter() - start), 2),
                    "client": request.client.host if request.client else None, **request.state.log,
                })
            except Exception:  # noqa: BLE001
                p.metrics.log_failures.inc()


def _add_metadata_routes(app: FastAPI, p: ServerState) -> None:
    """Health, server and model metadata, Triton's model configuration and the statistics."""

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> dict:
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "b2kd", "version": __version__,
                "extensions": ["binary_tensor_data", "statistics", "model_configuration"]}

    @app.get("/v2/models/stats")
    async def every_model_stats(request: Request) -> dict:
        p.gate.operator(request)
        return {"model_stats": [p.stats.model_stats()]}

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str = VERSION) -> dict:
        p.model_or_404(model, version)
        return p.served.metadata()

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str = VERSION) -> dict:
        p.model_or_404(model, version)
        return {"name": p.settings.model_name, "ready": True}

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str = VERSION) -> dict:
        p.model_or_404(model, version)
        return p.served.config()

    @app.get("/v2/models/{model}/stats")
    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def model_stats(request: Request, model: str, version: str = VERSION) -> dict:
        p.gate.operator(request)
        p.model_or_404(model, version)
        return {"model_stats": [p.stats.model_stats()]}


def _add_inference_route(app: FastAPI, p: ServerState) -> None:
    """``infer`` (model, key, rate, size checked in that order: the cheapest first) and /metrics."""

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(request: Request, model: str, version: str = VERSION) -> Response:
        start = time.perf_counter()
        p.model_or_404(model, version)
        kid = p.gate.authenticate(request)
        request.state.log["key"] = kid
        wait = p.limiter.wait(kid)
        if wait > 0:
            raise Refusal(429, f"rate limit of {p.settings.rate_limit:g} requests/s exceeded;"
                          f" retry in {wait:.2f} s", "rate_limit", {"Retry-After": str(math.ceil(wait))})
        try:
            body, received = await read_body(request, p.max_body, p.settings.read_timeout_s)
        except BodyError as exc:
            raise Refusal(exc.status, str(exc), exc.reason, {"Connection": "close"}) from None
        p.metrics.request_bytes.inc(received)
        out, length, n, replayed = await run_in_threadpool(
            p.served.answer, kid, body, request.headers.get(HEADER_LENGTH))
        (p.metrics.replayed if replayed else p.metrics.queries).labels(key=kid).inc(n)
        p.metrics.response_bytes.inc(len(out))
        p.metrics.latency.observe(time.perf_counter() - start)
        request.state.log.update(queries=n, replayed=replayed, bytes_in=received, bytes_out=len(out))
        if length is None:
            return Response(out, media_type="application/json")
        return Response(out, media_type="application/octet-stream", headers={HEADER_LENGTH: str(length)})

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        p.gate.operator(request)
        return Response(await run_in_threadpool(p.metrics.render), media_type=CONTENT_TYPE)
