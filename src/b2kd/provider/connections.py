"""How uvicorn holds connections for the teacher server: bounded in number and in time.

uvicorn limits concurrent connections (``limit_concurrency``: 503 beyond) and
header sizes (h11), and closes idle keep-alive connections, but it has no
timeout for a request's head: a client that connects and sends nothing, or
half a header, held a connection for ever (slowloris). :class:`HeadTimeoutH11`
closes a connection that has not completed a request head within
``head_timeout_s`` of connecting or of its previous answer; while the app
handles a request it is left alone (the app bounds the body read itself, see
:mod:`b2kd.provider.body`).
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadTimeoutH11(H11Protocol):
    head_timeout_s = 10.0
    _head_timer: asyncio.TimerHandle | None = None

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
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


def uvicorn_config(app, head_timeout_s: float, max_connections: int, **kw) -> uvicorn.Config:
    """uvicorn's settings for the teacher server (h11 with a head timeout, a connection limit)."""
    protocol = type("HeadTimeoutH11", (HeadTimeoutH11,), {"head_timeout_s": head_timeout_s})
    return uvicorn.Config(app, http=protocol, limit_concurrency=max_connections,
                          timeout_keep_alive=max(1, min(5, int(head_timeout_s))),
                          log_level="warning", access_log=False, **kw)
