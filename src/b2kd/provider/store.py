"""The server's durable state in one SQLite file, and :func:`open_store`, which picks the backend.

The protocol (reserve, settle, refund, replay) is :class:`b2kd.provider.store_base.Store`'s;
here only SQLite's connection. A ``postgresql://`` location opens
:class:`b2kd.provider.store_postgres.PostgresStore` instead. The shared names are importable
from here too.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from b2kd.core.sqlite_lock import while_locked
from b2kd.provider.store_base import (
    ANONYMOUS,
    PURGE_EVERY_S,
    SCHEMA,
    Answer,
    Execute,
    QuotaExhausted,
    RequestIdReused,
    Reservation,
    Store,
    StoreError,
    StoreUnavailable,
)

__all__ = ["ANONYMOUS", "PURGE_EVERY_S", "SCHEMA", "Answer", "Execute", "QuotaExhausted", "RequestIdReused",
           "Reservation", "SQLiteStore", "Store", "StoreError", "StoreUnavailable", "open_store"]


class SQLiteStore(Store):
    """The store in one SQLite file (WAL): threads take turns on one connection; processes on
    one file wait on SQLite's lock (up to ``timeout_s``)."""

    def __init__(self, path: str | Path, quotas: dict[str, int | None], timeout_s: float = 30.0, **kw):
        self.path = str(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            while_locked(lambda: self._db.execute("PRAGMA journal_mode=WAL"), timeout_s)
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives kill -9
        super().__init__(quotas, **kw)

    def __str__(self) -> str:
        return f"the state file {self.path}"

    @contextmanager
    def _transaction(self) -> Iterator[Execute]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"{self} is unavailable: {exc}") from None
            try:
                yield self._db.execute
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[Execute]:
        with self._lock:
            yield self._db.execute

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(location: str | Path, quotas: dict[str, int | None], **kw) -> Store:
    """A PostgreSQL store for a ``postgresql://`` URL, else an SQLite file (or ``:memory:``)."""
    if str(location).startswith(("postgresql://", "postgres://")):
        from b2kd.provider.store_postgres import PostgresStore

        return PostgresStore(str(location), quotas, **kw)
    return SQLiteStore(location, quotas, **kw)
