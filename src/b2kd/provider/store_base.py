"""The server's durable state: API-key quotas and the answers it was paid for.

A request's queries are *reserved* (charged, in one transaction that checks
the quota) before the model runs, and the reservation is *settled* (the answer
stored for replay) or *refunded* afterwards. So concurrent requests, in
threads or in several server processes on one store, can never spend more
than a key's quota, and no model runs for a request the quota cannot pay for.

A request id that was already answered is replayed from its record for free:
a client that retries after a lost connection, or after the server was killed
and restarted, is never charged twice. A request whose reservation a killed
server left behind is taken over by the client's retry (same id, same body)
without a second charge; a reservation without an id is refunded once it is
``lease_s`` old. Records are kept for ``ttl_s`` (the replay window) and at most
``per_key`` per key (the oldest go first), and deleted while the server runs.

Every transaction of a key starts by locking the key's row (SQLite: the
whole database, ``BEGIN IMMEDIATE``; PostgreSQL: ``SELECT ... FOR UPDATE``),
so the same code is atomic on both. :class:`b2kd.provider.store.SQLiteStore` serves one host;
:class:`b2kd.provider.store_postgres.PostgresStore` serves several; :func:`b2kd.provider.store.open_store`
opens either. This module holds what both share (the protocol, its errors and records), so
neither backend imports the other.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

#: Stands for every caller of a server that has no API keys.
ANONYMOUS = "anonymous"
PURGE_EVERY_S = 60.0  # how often expired records and abandoned reservations are deleted

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    quota {int},
    used {int} NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS answers (
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    queries {int} NOT NULL,
    body {blob} NOT NULL,
    header_length {int},
    created {real} NOT NULL,
    PRIMARY KEY (key_id, request_id)
);
CREATE INDEX IF NOT EXISTS answers_created ON answers (created);
CREATE INDEX IF NOT EXISTS answers_key_created ON answers (key_id, created);
CREATE TABLE IF NOT EXISTS reservations (
    key_id TEXT NOT NULL,
    token TEXT NOT NULL,
    digest TEXT NOT NULL,
    queries {int} NOT NULL,
    created {real} NOT NULL,
    PRIMARY KEY (key_id, token)
);
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
"""


class StoreError(ValueError):
    """A store that cannot be used as configured; the message says why."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or is locked past its timeout (the server answers 503)."""


class QuotaExhausted(Exception):
    def __init__(self, used: int, quota: int, wanted: int):
        super().__init__(f"query quota exhausted: {used} of {quota} queries used and {wanted} more"
                         " requested; nothing was charged")


class RequestIdReused(Exception):
    """The same request id came back with a different body."""


@dataclass
class Answer:
    body: bytes
    header_length: int | None
    replayed: bool


@dataclass(frozen=True)
class Reservation:
    """Queries charged to a key for a request being computed."""

    key_id: str
    token: str  # "id:" + the request id, or "anon:" + a random id
    request_id: str | None
    digest: str
    queries: int


Execute = Callable[..., sqlite3.Cursor]


class Store:
    """Quotas, reservations and stored answers; subclasses give the connection and SQL dialect."""

    FOR_UPDATE = ""
    TYPES: ClassVar[dict[str, str]] = {"int": "INTEGER", "blob": "BLOB", "real": "REAL"}

    def __init__(self, quotas: dict[str, int | None], secret_check: str,
                 legacy_ids: dict[str, str] | None = None, ttl_s: float = 86400.0,
                 per_key: int = 10000, lease_s: float = 600.0, clock: Callable[[], float] = time.time):
        self.ttl_s, self.per_key, self.lease_s, self.clock = ttl_s, per_key, lease_s, clock
        self._purged = -float("inf")
        with self._transaction() as ex:
            self._create_schema(ex)
            row = ex("SELECT value FROM meta WHERE name = 'key_secret'").fetchone()
            if row is None:  # a new store, or one written before key ids were keyed hashes
                ex("INSERT INTO meta (name, value) VALUES ('key_secret', ?)", (secret_check,))
                for old, new in (legacy_ids or {}).items():
                    ex("UPDATE keys SET key_id = ? WHERE key_id = ?", (new, old))
                    ex("UPDATE answers SET key_id = ? WHERE key_id = ?", (new, old))
            elif row[0] != secret_check:
                raise StoreError(f"{self} was written by a server with another key secret: start it"
                                 " with the same secret (serve.secret_file), or every key would"
                                 " start again from a zero quota")
            for kid, quota in quotas.items():
                ex("INSERT INTO keys (key_id, quota) VALUES (?, ?)"
                   " ON CONFLICT (key_id) DO UPDATE SET quota = excluded.quota", (kid, quota))
        self.purge()

    # --- what a backend provides ----------------------------------------------------------------

    def _transaction(self):  # -> context manager yielding execute(sql, params) in one transaction
        raise NotImplementedError

    def _read(self):  # -> context manager yielding execute(sql, params) for a read
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _create_schema(self, ex: Execute) -> None:
        for statement in SCHEMA.format(**self.TYPES).split(";"):
            ex(statement)

    # --- the protocol -----------------------------------------------------------------------------

    def _stored(self, ex: Execute, kid: str, request_id: str, digest: str) -> Answer | None:
        row = ex("SELECT digest, body, header_length FROM answers"
                 " WHERE key_id = ? AND request_id = ? AND created >= ?",
                 (kid, request_id, self.clock() - self.ttl_s)).fetchone()
        if row is None:
            return None
        if row[0] != digest:
            raise RequestIdReused(f"request id '{request_id}' was already used with a different body")
        return Answer(bytes(row[1]), row[2], replayed=True)

    def _lock_key(self, ex: Execute, kid: str) -> tuple[int | None, int]:
        """(quota, used) of the key, its row locked until the transaction ends."""
        ex("INSERT INTO keys (key_id, quota) VALUES (?, NULL) ON CONFLICT (key_id) DO NOTHING", (kid,))
        return ex("SELECT quota, used FROM keys WHERE key_id = ?" + self.FOR_UPDATE, (kid,)).fetchone()

    @staticmethod
    def _charge(ex: Execute, kid: str, quota: int | None, used: int, queries: int) -> None:
        if quota is not None and used + queries > quota:
            raise QuotaExhausted(used, quota, queries)
        ex("UPDATE keys SET used = used + ? WHERE key_id = ?", (queries, kid))

    def replay(self, kid: str, request_id: str | None, digest: str) -> Answer | None:
        """The stored answer to this request id, if it was paid for within the replay window."""
        if request_id is None:
            return None
        with self._read() as ex:
            return self._stored(ex, kid, request_id, digest)

    def reserve(self, kid: str, request_id: str | None, digest: str, queries: int) -> Reservation | Answer:
        """Charge ``queries`` before computing (QuotaExhausted if the key cannot pay), or the stored
        answer if a twin of this request was settled meanwhile."""
        self._maybe_purge()
        token = f"id:{request_id}" if request_id is not None else f"anon:{uuid.uuid4().hex}"
        held = Reservation(kid, token, request_id, digest, queries)
        with self._transaction() as ex:
            quota, used = self._lock_key(ex, kid)
            if request_id is not None:
                stored = self._stored(ex, kid, request_id, digest)
                if stored is not None:
                    return stored
                row = ex("SELECT digest FROM reservations WHERE key_id = ? AND token = ?",
                         (kid, token)).fetchone()
                if row is not None:  # being answered, or left by a killed server: paid once already
                    if row[0] != digest:
                        raise RequestIdReused(f"request id '{request_id}' is in use with a different body")
                    return held
            self._charge(ex, kid, quota, used, queries)
            ex("INSERT INTO reservations (key_id, token, digest, queries, created) VALUES (?, ?, ?, ?, ?)",
               (kid, token, digest, queries, self.clock()))
        return held

    def settle(self, held: Reservation, body: bytes, header_length: int | None) -> Answer:
        """Keep the answer of a reserved request (for replay); the queries stay charged."""
        kid = held.key_id
        with self._transaction() as ex:
            quota, used = self._lock_key(ex, kid)
            if held.request_id is not None:
                stored = self._stored(ex, kid, held.request_id, held.digest)
                if stored is not None:  # a twin settled first: its answer stands, paid once
                    return stored
            gone = ex("DELETE FROM reservations WHERE key_id = ? AND token = ?",
                      (kid, held.token)).rowcount == 0
            if gone:  # refunded meanwhile (a failed twin, or an expired lease): charge it now
                self._charge(ex, kid, quota, used, held.queries)
            if held.request_id is not None:
                ex("INSERT INTO answers (key_id, request_id, digest, queries, body, header_length, created)"
                   " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, request_id) DO UPDATE SET"
                   " digest = excluded.digest, queries = excluded.queries, body = excluded.body,"
                   " header_length = excluded.header_length, created = excluded.created",
                   (kid, held.request_id, held.digest, held.queries, body, header_length, self.clock()))
                self._cap(ex, kid)
        return Answer(body, header_length, replayed=False)

    def refund(self, held: Reservation) -> None:
        """Give back the queries of a reservation that was not settled (nothing if it is gone)."""
        with self._transaction() as ex:
            self._lock_key(ex, held.key_id)
            row = ex("SELECT queries FROM reservations WHERE key_id = ? AND token = ?",
                     (held.key_id, held.token)).fetchone()
            if row is not None:
                ex("DELETE FROM reservations WHERE key_id = ? AND token = ?", (held.key_id, held.token))
                ex("UPDATE keys SET used = used - ? WHERE key_id = ?", (row[0], held.key_id))

    def _cap(self, ex: Execute, kid: str) -> None:
        count = ex("SELECT COUNT(*) FROM answers WHERE key_id = ?", (kid,)).fetchone()[0]
        if count > self.per_key:
            ex("DELETE FROM answers WHERE key_id = ? AND request_id IN (SELECT request_id FROM answers"
               " WHERE key_id = ? ORDER BY created, request_id LIMIT ?)", (kid, kid, count - self.per_key))

    def purge(self) -> None:
        """Delete records past the replay window; refund reservations past their lease."""
        now = self.clock()
        self._purged = now
        with self._transaction() as ex:
            ex("DELETE FROM answers WHERE created < ?", (now - self.ttl_s,))
            stale = ex("SELECT key_id, token, digest, queries FROM reservations WHERE created < ?",
                       (now - self.lease_s,)).fetchall()
        for kid, token, digest, queries in stale:
            self.refund(Reservation(kid, token, None, digest, queries))

    def _maybe_purge(self) -> None:
        if self.clock() - self._purged >= PURGE_EVERY_S:
            self.purge()

    def usage(self) -> dict[str, tuple[int, int | None]]:
        """(used, quota) per key id."""
        with self._read() as ex:
            rows = ex("SELECT key_id, used, quota FROM keys ORDER BY key_id").fetchall()
        return {kid: (used, quota) for kid, used, quota in rows}

    def records(self) -> int:
        """Answers kept for replay."""
        with self._read() as ex:
            return ex("SELECT COUNT(*) FROM answers").fetchone()[0]
