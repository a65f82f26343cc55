"""Real servers on 127.0.0.1 for the tests: helpers shared by the server and client tests."""

from __future__ import annotations

import socket
import threading
import time
from typing import Self

import torch
import uvicorn

from b2kd.blackbox import LocalBackend
from b2kd.models import build_model
from b2kd.provider.connections import uvicorn_config
from b2kd.provider.serve import listen
from b2kd.provider.server import ServerSettings, create_app


def toy_model() -> torch.nn.Module:
    """A seeded, untrained LeNet-5 for 28x28 grey images: answers do not need a trained teacher."""
    torch.manual_seed(0)
    return build_model("lenet5", num_classes=10, in_channels=1, image_size=28).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=rng)


class ThreadServer:
    """A b2kd server app run by uvicorn in a thread of this process, on a free port, with the
    connection limits of ``b2kd serve``. ``model`` is a network or a ready backend."""

    def __init__(self, model: torch.nn.Module | LocalBackend, kind: str = "soft", **settings):
        backend = model if isinstance(model, LocalBackend) else LocalBackend(model, kind)
        options = ServerSettings(**settings)
        self.app = create_app(backend, options)
        self._sock = listen("127.0.0.1", 0)
        self.port = self._sock.getsockname()[1]
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/v2/models/teacher"
        self._server = uvicorn.Server(uvicorn_config(self.app, options.read_timeout_s, options.max_connections))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def raw_head(path: str, headers: dict[str, str], length: int | None = None, method: str = "POST") -> bytes:
    """An HTTP/1.1 request head, written by hand so that a test can lie in it."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_status(sock: socket.socket) -> int | None:
    """The status of the server's answer on ``sock``, or None if it closed the connection without
    one. A server that holds the connection past the socket's timeout raises ``TimeoutError``."""
    data = b""
    try:
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
    except ConnectionResetError:
        return None
    return int(data.split(b" ", 2)[1])


def raw_request(port: int, data: bytes, half_close: bool = False, timeout: float = 20.0) -> int | None:
    """Send ``data`` as is on a new connection: the answer's status, or None for a closed connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (and closed) before reading everything: read what it said
        return read_status(sock)
