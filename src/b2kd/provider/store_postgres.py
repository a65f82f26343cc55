"""The server's state in PostgreSQL, for several server hosts on one quota (``--store postgresql://...``).

The logic is :class:`b2kd.provider.store_base.Store`'s; here only the connection:
one per server process (psycopg 3), used by one thread at a time, reopened
after it breaks. Each transaction of a key locks the key's row
(``SELECT ... FOR UPDATE``), so charges are atomic across hosts; the schema is
created under an advisory lock, so servers may start side by side.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

from b2kd.provider.store_base import Store, StoreError, StoreUnavailable

SCHEMA_LOCK = 0x62326B64  # "b2kd": serialises CREATE TABLE IF NOT EXISTS across processes


def redact(url: str) -> str:
    """The URL with its password, if any, replaced by ***."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


class PostgresStore(Store):
    FOR_UPDATE = " FOR UPDATE"
    TYPES: ClassVar[dict[str, str]] = {"int": "BIGINT", "blob": "BYTEA", "real": "DOUBLE PRECISION"}

    def __init__(self, url: str, quotas: dict[str, int | None], timeout_s: float = 30.0, **kw):
        try:
            import psycopg
        except ImportError:
            raise StoreError("a PostgreSQL store needs psycopg: pip install 'b2kd[postgres]'") from None
        self._psycopg, self.url, self.timeout_s = psycopg, url, timeout_s
        self._lock = threading.Lock()
        self._conn = None
        super().__init__(quotas, **kw)

    def __str__(self) -> str:
        return f"the PostgreSQL store {redact(self.url)}"

    def _connection(self):
        if self._conn is None or self._conn.closed or self._conn.broken:
            # lock_timeout bounds a wait on another process's row lock; a stuck host cannot hang us
            self._conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=10,
                                               options=f"-c lock_timeout={int(self.timeout_s * 1000)}")
        return self._conn

    @contextmanager
    def _session(self, transaction: bool) -> Iterator:
        with self._lock:
            try:
                conn = self._connection()
                if not transaction:
                    yield lambda sql, params=(): conn.execute(sql.replace("?", "%s"), params)
                    return
                with conn.transaction():
                    yield lambda sql, params=(): conn.execute(sql.replace("?", "%s"), params)
            except self._psycopg.OperationalError as exc:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise StoreUnavailable(f"{self} is unavailable: {detail}") from None

    def _transaction(self):
        return self._session(transaction=True)

    def _read(self):
        return self._session(transaction=False)

    def _create_schema(self, ex) -> None:
        ex("SELECT pg_advisory_xact_lock(?)", (SCHEMA_LOCK,))
        super()._create_schema(ex)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
