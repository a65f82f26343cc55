"""Reading a request body as a hostile client might send it: slowly, hugely, or compressed.

The whole body must arrive within ``timeout_s`` (408 otherwise, and the
connection is closed), so a half-open request cannot hold a worker. A body
with ``Content-Encoding: gzip`` or ``deflate`` is decompressed as it streams
in, at most ``max_bytes + 1`` bytes at a time: the limit counts the
decompressed size, and a small compressed "bomb" is refused (413) after
``max_bytes`` of output, never expanded in full.
"""

from __future__ import annotations

import asyncio
import zlib

from starlette.requests import ClientDisconnect, Request

#: Content-Encoding -> zlib window bits (gzip framing; zlib framing, which HTTP calls deflate).
DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class BodyError(Exception):
    """A body refused: HTTP status, message, metrics reason; ``close`` ends the connection."""

    def __init__(self, status: int, message: str, reason: str, close: bool = False):
        super().__init__(message)
        self.status, self.reason, self.close = status, reason, close


class _Inflater:
    """Streaming decompression that never holds more than ``limit`` bytes of output."""

    def __init__(self, encoding: str, limit: int):
        self._z = zlib.decompressobj(DECODERS[encoding])
        self.encoding, self.limit, self.size = encoding, limit, 0

    def _grow(self, out: bytes) -> bytes:
        self.size += len(out)
        if self.size > self.limit:
            raise BodyError(413, f"request body over {self.limit} bytes once decompressed", "too_large")
        return out

    def feed(self, data: bytes) -> list[bytes]:
        parts = []
        try:
            while data:
                if self._z.eof:
                    raise BodyError(400, f"data after the end of the {self.encoding} stream", "bad_request")
                parts.append(self._grow(self._z.decompress(data, self.limit - self.size + 1)))
                data = self._z.unconsumed_tail
        except zlib.error as exc:
            raise BodyError(400, f"the body is not valid {self.encoding} data: {exc}", "bad_request") from None
        if self._z.unused_data:
            raise BodyError(400, f"data after the end of the {self.encoding} stream", "bad_request")
        return parts

    def finish(self) -> bytes:
        try:
            tail = self._grow(self._z.flush(self.limit - self.size + 1))
        except zlib.error as exc:
            raise BodyError(400, f"the body is not valid {self.encoding} data: {exc}", "bad_request") from None
        if not self._z.eof:
            raise BodyError(400, f"the {self.encoding} body is truncated", "bad_request")
        return tail


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> tuple[bytes, int]:
    """(body, bytes received): decompressed if sent compressed, at most ``max_bytes`` either way."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "", *DECODERS):
        raise BodyError(415, f"unsupported Content-Encoding '{encoding[:40]}': send identity, gzip"
                        " or deflate", "bad_request")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise BodyError(413, f"request body of {declared} bytes; at most {max_bytes}", "too_large")
    inflater = _Inflater(encoding, max_bytes) if encoding in DECODERS else None
    chunks, received = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise BodyError(413, f"request body over {max_bytes} bytes", "too_large")
                chunks.extend(inflater.feed(chunk) if inflater else [chunk])
    except TimeoutError:
        raise BodyError(408, f"the request body did not arrive within {timeout_s:g} s", "timeout",
                        close=True) from None
    except ClientDisconnect:
        raise BodyError(400, "the request body was cut short", "bad_request", close=True) from None
    if inflater is not None:
        chunks.append(inflater.finish())
    return b"".join(chunks), received
