"""Real servers on 127.0.0.1 for the tests: helpers shared by the server and client tests."""

from __future__ import annotations

import threading
import time
from typing import Self

import torch
import uvicorn

from b2kd.blackbox import LocalBackend
from b2kd.blackbox.server import ServerSettings, create_app
from b2kd.models import build_model
from b2kd.serve import listen


def toy_model() -> torch.nn.Module:
    """A seeded, untrained LeNet-5 for 28x28 grey images: answers do not need a trained teacher."""
    torch.manual_seed(0)
    return build_model("lenet5", num_classes=10, in_channels=1, image_size=28).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=rng)


class ThreadServer:
    """A b2kd server app run by uvicorn in a thread of this process, on a free port."""

    def __init__(self, model: torch.nn.Module, kind: str = "soft", **settings):
        self.app = create_app(LocalBackend(model, kind), ServerSettings(**settings))
        self._sock = listen("127.0.0.1", 0)
        self.root = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.url = f"{self.root}/v2/models/teacher"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
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
