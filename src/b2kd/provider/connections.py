"""How uvicorn holds connections for the teacher server: bounded in number and in time.

uvicorn limits concurrent connections (``limit_concurrency``: 503 beyond) and
header sizes (h11), and closes idle keep-alive connections, but it has no
timeout for a request's head: a client that connects and sends nothing, or
half a header, held a connection for ever (slowloris). :class:`HeadTimeoutH11`
closes a connection that has not completed a request head within
``head_timeout_s`` of connecting or of its previous answer; while the app
handles a request it is left alone (the app bounds the body read itself, see
:mod:`b2kd.provider.body`).

The connection limits are applied here too, not by uvicorn: uvicorn answers its own 503s
outside the app, so they reached neither ``/metrics`` nor the access log, and 1,005 idle
sockets from one address made every request, health checks included, a 503 until they timed
out. So a request that arrives while ``max_connections`` connections are open (or requests
in flight) is answered 503 in front of the app, and one address may hold at most
``per_address`` connections (default a quarter of ``max_connections``): a connection beyond
that is answered 503 at once and closed, so one client cannot take the others' share. Each
of these 503s goes to ``on_refused`` (:func:`b2kd.provider.server.create_app` counts it in
``b2kd_refusals_total`` and ``b2kd_http_requests_total`` and writes it to the access log).

Behind a reverse proxy every connection comes from the proxy's address: limit connections
per client at the proxy (nginx ``limit_conn``), and give ``serve.max_connections`` at least
four times the connections the proxy opens to the server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import ClassVar

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

#: What the server does with a 503 it answers outside the app: (reason, access-log fields).
Refused = Callable[[str, dict], None]
#: The share of ``max_connections`` one client address may hold by default.
PER_ADDRESS_SHARE = 4


def _ignore(reason: str, record: dict) -> None:
    pass


def per_address_limit(max_connections: int, per_address: int | None = None) -> int:
    """Connections one address may hold: the given number, else a quarter of ``max_connections``."""
    return per_address if per_address is not None else max(1, max_connections // PER_ADDRESS_SHARE)


def _unavailable(message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers, body) of a 503 that asks to retry in a second and closes the connection."""
    body = json.dumps({"error": message}).encode()
    return [(b"content-type", b"application/json"), (b"retry-after", b"1"), (b"connection", b"close"),
            (b"content-length", str(len(body)).encode())], body


class HeadTimeoutH11(H11Protocol):
    head_timeout_s = 10.0
    max_connections: int | None = None  # connections or requests in flight: 503 at this many
    per_address: int | None = None  # connections one client address may hold
    on_refused: Refused = staticmethod(_ignore)
    open_by_address: ClassVar[dict[str, int]] = {}  # per server: uvicorn_config gives each its own
    _head_timer: asyncio.TimerHandle | None = None
    _address: str | None = None  # the client address this connection is counted under
    _full = False  # whether the server was at its limit when this request's head arrived

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # applied in front of the app instead, where it is counted
        self._app, self.app = self.app, self._limited

    def data_received(self, data: bytes) -> None:
        """Bytes of a new request's head: is the server at its limit now? (uvicorn's own rule and
        moment: connections, or requests in flight, at ``max_connections``)."""
        if self.max_connections is not None and (self.cycle is None or self.cycle.response_complete):
            self._full = max(len(self.connections), len(self.tasks)) >= self.max_connections
        super().data_received(data)

    async def _limited(self, scope, receive, send) -> None:
        """The app, unless the server was at its connection limit (then a 503, counted and logged)."""
        if scope["type"] != "http" or not self._full:
            return await self._app(scope, receive, send)
        message = (f"the server is at its limit of {self.max_connections} connections and requests;"
                   " retry shortly")
        self.on_refused("connections", {"method": scope.get("method"), "path": scope.get("path"),
                                        "client": self.client[0] if self.client else None,
                                        "error": message})
        headers, body = _unavailable(message)
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _refuse_connection(self, host: str) -> None:
        """Answer a connection beyond the per-address limit with a 503 at once, and close it."""
        message = (f"{host} holds {self.per_address} connections to this server, its most;"
                   " retry once one has closed")
        self.on_refused("connections_per_address", {"method": None, "path": None, "client": host,
                                                    "error": message})
        headers, body = _unavailable(message)
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\n"
                             + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body)
        self.transport.close()

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._expire)

    def _expire(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return  # the app has a request in hand; the next answer re-arms the timer
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else "?"
        held = self.open_by_address.get(host, 0)
        if self.per_address is not None and held >= self.per_address:
            self._refuse_connection(host)
            return
        self.open_by_address[host] = held + 1
        self._address = host
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._address is not None:
            left = self.open_by_address.get(self._address, 1) - 1
            if left > 0:
                self.open_by_address[self._address] = left
            else:
                self.open_by_address.pop(self._address, None)
            self._address = None
        super().connection_lost(exc)


def uvicorn_config(app, head_timeout_s: float, max_connections: int, per_address: int | None = None,
                   on_refused: Refused | None = None, **kw) -> uvicorn.Config:
    """uvicorn's settings for the teacher server: h11 with a head timeout and the connection limits.

    ``per_address`` and ``on_refused`` default to what a b2kd app (create_app) says in its state:
    ``settings.max_connections_per_address`` and ``on_refused``."""
    state = getattr(app, "state", None)
    if per_address is None:
        per_address = getattr(getattr(state, "settings", None), "max_connections_per_address", None)
    protocol = type("HeadTimeoutH11", (HeadTimeoutH11,), {
        "head_timeout_s": head_timeout_s, "max_connections": max_connections,
        "per_address": per_address_limit(max_connections, per_address),
        "on_refused": staticmethod(on_refused or getattr(state, "on_refused", None) or _ignore),
        "open_by_address": {}})
    return uvicorn.Config(app, http=protocol, timeout_keep_alive=max(1, min(5, int(head_timeout_s))),
                          log_level="warning", access_log=False, **kw)
