"""The server's durable state: API-key quotas and the answers it was paid for (SQLite).

Charging and recording happen in one ``BEGIN IMMEDIATE`` transaction, so
concurrent requests (threads, or several server processes on one file) can
never spend more than a key's quota, and an answer is either both paid and
stored or neither. A request whose id was already answered is replayed from
its record for free: a client that retries after a lost connection, or after
the server was killed and restarted, is never charged twice.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    quota INTEGER,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS answers (
    key_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    queries INTEGER NOT NULL,
    body BLOB NOT NULL,
    header_length INTEGER,
    created REAL NOT NULL,
    PRIMARY KEY (key_id, request_id)
);
CREATE INDEX IF NOT EXISTS answers_created ON answers (created);
"""

#: Stands for every caller of a server that has no API keys.
ANONYMOUS = "anonymous"


def key_id(key: str) -> str:
    """What the server stores and logs instead of a key: a short hash of it."""
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:16]


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


class QuotaStore:
    """Quotas per key and stored answers in ``path``; answers older than ``ttl_s`` are dropped."""

    def __init__(self, path: str | Path, quotas: dict[str, int | None], ttl_s: float = 86400.0):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection, one lock: threads of this process take turns; other processes
        # wait on SQLite's own lock (timeout) and BEGIN IMMEDIATE.
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        self.ttl_s = ttl_s
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives kill -9
            self._db.executescript(SCHEMA)
            self._db.execute("BEGIN IMMEDIATE")
            for kid, quota in quotas.items():
                self._db.execute(
                    "INSERT INTO keys (key_id, quota) VALUES (?, ?)"
                    " ON CONFLICT (key_id) DO UPDATE SET quota = excluded.quota",
                    (kid, quota),
                )
            self._db.execute("DELETE FROM answers WHERE created < ?", (time.time() - ttl_s,))
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _stored(self, kid: str, request_id: str, digest: str) -> Answer | None:
        row = self._db.execute(
            "SELECT digest, body, header_length FROM answers WHERE key_id = ? AND request_id = ?",
            (kid, request_id),
        ).fetchone()
        if row is None:
            return None
        if row[0] != digest:
            raise RequestIdReused(f"request id '{request_id}' was already used with a different body")
        return Answer(row[1], row[2], replayed=True)

    def replay(self, kid: str, request_id: str | None, digest: str) -> Answer | None:
        """The stored answer to this request id, if it was already paid for."""
        if request_id is None:
            return None
        with self._lock:
            return self._stored(kid, request_id, digest)

    def ensure_affordable(self, kid: str, queries: int) -> None:
        """Raise QuotaExhausted now for a request the key cannot pay for (``charge`` checks again)."""
        with self._lock:
            row = self._db.execute("SELECT quota, used FROM keys WHERE key_id = ?", (kid,)).fetchone()
        if row is not None and row[0] is not None and row[1] + queries > row[0]:
            raise QuotaExhausted(row[1], row[0], queries)

    def charge(self, kid: str, request_id: str | None, digest: str, queries: int, body: bytes,
               header_length: int | None) -> Answer:
        """Charge ``queries`` to the key and keep the answer, atomically; or replay a paid one."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if request_id is not None:
                    stored = self._stored(kid, request_id, digest)
                    if stored is not None:  # a concurrent twin of this request won the race
                        self._db.execute("COMMIT")
                        return stored
                self._db.execute("INSERT OR IGNORE INTO keys (key_id, quota) VALUES (?, NULL)", (kid,))
                quota, used = self._db.execute(
                    "SELECT quota, used FROM keys WHERE key_id = ?", (kid,)).fetchone()
                if quota is not None and used + queries > quota:
                    raise QuotaExhausted(used, quota, queries)
                self._db.execute("UPDATE keys SET used = used + ? WHERE key_id = ?", (queries, kid))
                if request_id is not None:
                    self._db.execute(
                        "INSERT INTO answers (key_id, request_id, digest, queries, body,"
                        " header_length, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (kid, request_id, digest, queries, body, header_length, time.time()),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return Answer(body, header_length, replayed=False)

    def usage(self) -> dict[str, tuple[int, int | None]]:
        """(used, quota) per key id."""
        with self._lock:
            rows = self._db.execute("SELECT key_id, used, quota FROM keys ORDER BY key_id").fetchall()
        return {kid: (used, quota) for kid, used, quota in rows}
