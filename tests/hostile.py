"""A fake v2 server on 127.0.0.1 for the client's tests: honest metadata, inference answered as told.

Written on the standard library's HTTP server so that a test controls every
status, header and byte of an answer (Retry-After: nan, NaN in a binary
tensor, ``"parameters": null``, a non-string datatype), which no real
server would send on purpose. It counts the requests it receives per path.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import numpy as np

from b2kd.blackbox.protocol import HEADER_LENGTH, Tensor, decode, encode, header_length

K = 10
METADATA = {
    "name": "teacher", "platform": "fake",
    "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}],
    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, K]}],
}

#: What an inference handler returns: status, headers, body.
Reply = tuple[int, dict[str, str], bytes]


def request_of(body: bytes, headers) -> tuple[str, np.ndarray]:
    """(request id, input array) of an inference request b2kd sent."""
    raw = headers.get(HEADER_LENGTH)
    msg = decode(body, header_length(raw, len(body)), "inputs")
    return msg.header.get("id", ""), next(iter(msg.tensors.values()))


def answer(request_id: str, scores: np.ndarray, binary: bool = True, **extra: Any) -> Reply:
    """A 200 answer with one FP32 output 'scores' (NaN and inf travel in binary)."""
    if binary:
        body, length = encode({"id": request_id, **extra}, "outputs",
                              [Tensor("scores", scores.astype(np.float32))])
        return 200, {HEADER_LENGTH: str(length), "Content-Type": "application/octet-stream"}, body
    entry = {"name": "scores", "datatype": "FP32", "shape": list(scores.shape), "parameters": None,
             "data": scores.astype(np.float32).ravel().tolist()}
    return 200, {"Content-Type": "application/json"}, json.dumps(
        {"id": request_id, "model_name": "teacher", "model_version": None, "parameters": None,
         "outputs": [entry], **extra}).encode()


def uniform(n: int) -> np.ndarray:
    return np.full((n, K), 1 / K, dtype=np.float32)


def refuse(status: int, retry_after: str | None = None, error: str = "busy") -> Reply:
    headers = {"Content-Type": "application/json"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return status, headers, json.dumps({"error": error}).encode()


class _Server(ThreadingHTTPServer):
    """Quiet when a client hangs up mid-answer (b2kd gave up waiting, as a test asked it to).

    Any other handler error is printed as the standard library does; a client that closed
    its socket is expected here, and its traceback would land in the CLI's captured stderr.
    """

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class Hostile:
    """``with Hostile(infer) as s: s.url``; ``infer(request body, headers) -> Reply``.

    ``metadata`` and ``config`` (the body of ``/v2/models/NAME/config``; None: 404) are served as given.
    """

    def __init__(self, infer: Callable[[bytes, Any], Reply], metadata: dict | None = None,
                 config: dict | None = None):
        self.requests: Counter[str] = Counter()
        outer = self
        meta = json.dumps(metadata or METADATA).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                outer.requests[self.path] += 1
                if self.path.endswith("/config"):
                    if config is None:
                        self._reply(404, {"Content-Type": "application/json"}, b'{"error": "Not Found"}')
                    else:
                        self._reply(200, {"Content-Type": "application/json"}, json.dumps(config).encode())
                else:
                    self._reply(200, {"Content-Type": "application/json"}, meta)

            def do_POST(self) -> None:
                outer.requests[self.path] += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._reply(*infer(body, self.headers))

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.url = self.root + "/v2/models/teacher"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def infers(self) -> int:
        return sum(n for path, n in self.requests.items() if path.endswith("/infer"))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
