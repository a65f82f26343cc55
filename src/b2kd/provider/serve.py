"""``b2kd serve``: a teacher checkpoint behind the Open Inference Protocol, as a provider runs it.

Also :class:`ServedTeacher`, which runs ``b2kd serve`` in a subprocess on
127.0.0.1 and stops it again (also on error): what the demo, the tests and
the throughput benchmark use to talk to a real server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import httpx

from b2kd.blackbox import LocalBackend, TeacherUnavailable
from b2kd.core.config import Config, ConfigError
from b2kd.provider.keys import KEYS_ENV


def listen(host: str, port: int) -> socket.socket:
    """A bound listening socket, or a one-line error (port in use, bad address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is TCP, and
    # without it each answer's body waits for the client's delayed ACK (40 ms per request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def serve(cfg: Config, log=print) -> None:
    """Serve ``cfg.teacher.checkpoint`` until SIGINT or SIGTERM (both shut down gracefully).

    The run directory ``cfg.out`` keeps ``state.sqlite`` (quotas, paid answers:
    a restarted server goes on where it stopped; or ``serve.store``, a
    PostgreSQL URL), ``secret`` (the key-id secret) and ``access.log``.
    """
    import uvicorn

    from b2kd.core.runtime import prepare_run
    from b2kd.provider.connections import uvicorn_config
    from b2kd.provider.keys import KeySetupError, load_secret, parse_key_outputs, server_keys
    from b2kd.provider.server import ServerSettings, create_app
    from b2kd.provider.store_postgres import redact

    s = cfg.serve
    if not cfg.teacher.checkpoint:
        raise ConfigError("no checkpoint to serve: pass --checkpoint PATH (or set teacher.checkpoint)")
    keys = server_keys(s.api_keys, s.api_key_file)
    if s.api_key_file and Path(s.api_key_file).stat().st_mode & 0o077:
        log(f"warning: the API key file {s.api_key_file} can be read by other users (chmod 600 it)")
    backend = LocalBackend.from_checkpoint(cfg.teacher.checkpoint, s.response)
    out, _ = prepare_run(cfg, cfg.out)
    secret = load_secret(s.secret_file or out / "secret", create=s.secret_file is None)
    state = s.store or out / "state.sqlite"
    settings = ServerSettings(
        model_name=s.model_name, api_keys=keys, rate_limit=s.rate_limit, burst=s.burst,
        max_batch=s.max_batch, max_body_bytes=s.max_body_bytes, state=state,
        access_log=out / "access.log", secret=secret,
        metrics_key=s.metrics_key or os.environ.get("B2KD_METRICS_KEY") or None,
        replay_ttl_s=s.replay_ttl_s, replay_per_key=s.replay_per_key, read_timeout_s=s.read_timeout_s,
        max_connections=s.max_connections, max_connections_per_address=s.max_connections_per_address,
        auth_failures=s.auth_failures,
        key_outputs=parse_key_outputs(s.key_outputs),
    )
    try:
        app = create_app(backend, settings)  # opens the store: a wrong secret or URL ends here
    except KeySetupError as exc:  # outputs or keys of --key-outputs that do not exist
        raise ConfigError(str(exc)) from None
    sock = listen(s.host, s.port)
    host, port = sock.getsockname()[:2]
    if backend.embedding_dim:
        log(f"warning: every answer discloses the teacher's {backend.embedding_dim}-value embedding;"
            " it makes the model easier to copy (keep it to some keys with --key-outputs)")
    log(f"serving {cfg.teacher.checkpoint} ({backend.kind} responses,"
        f" {len(keys) or 'no'} API key{'s' if len(keys) != 1 else ''})"
        f" at http://{host}:{port}/v2/models/{s.model_name}; log in {out},"
        f" quotas in {redact(str(state))}")
    server = uvicorn.Server(uvicorn_config(app, s.read_timeout_s, s.max_connections,
                                           timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServedTeacher:
    """``b2kd serve`` in a subprocess on 127.0.0.1: ``with ServedTeacher(...) as s: s.url``.

    ``start`` launches and ``wait`` blocks until ``/v2/health/ready`` answers, so
    several servers can start side by side. Output goes to ``out/serve.log``.
    ``api_keys`` reach the server through its environment (B2KD_SERVE_KEYS), never its
    command line, which any user of the machine can read in ``ps``.
    """

    def __init__(self, checkpoint: str | Path, out: str | Path, response: str = "soft",
                 api_keys: tuple[str, ...] = (), port: int | None = None, threads: int | None = 1,
                 overrides: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.out = Path(out)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v2/models/teacher"
        self.cmd = [sys.executable, "-m", "b2kd.cli", "serve", "--checkpoint", str(checkpoint),
                    "--host", "127.0.0.1", "--port", str(self.port), "--response", response,
                    "--out", str(self.out), *([f"threads={threads}"] if threads else []), *overrides]
        self.env = {**os.environ, "COLUMNS": "200", **(env or {})}
        if api_keys:  # beside any keys the environment already gives
            self.env[KEYS_ENV] = " ".join([*api_keys, self.env.get(KEYS_ENV, "")]).strip()
        self.process: subprocess.Popen | None = None

    def start(self) -> Self:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "serve.log", "ab") as log:
            self.process = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait(self, timeout: float = 120.0) -> Self:
        deadline = time.monotonic() + timeout
        ready = self.url.split("/v2/")[0] + "/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                lines = (self.out / "serve.log").read_text(errors="replace").strip().splitlines()
                raise TeacherUnavailable(f"the teacher server did not start: {lines[-1] if lines else '?'}"
                                         f" (see {self.out / 'serve.log'})")
            try:
                if httpx.get(ready, timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TeacherUnavailable(f"the teacher server was not ready within {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Self:
        return self.start().wait()

    def __exit__(self, *exc) -> None:
        self.stop()
