"""Opening one SQLite file from several processes at once: retry SQLite's deadlock refusal.

Two processes that open the same new database together (bench cells sharing a ledger,
server processes sharing a state file) can each hold a read lock while asking for the
write lock that switching to WAL or creating tables needs. SQLite breaks that deadlock by
answering one of them "database is locked" at once, without waiting out the connection's
busy timeout. The other finishes within milliseconds, so short retries settle it.
"""

from __future__ import annotations

import sqlite3
import time


def while_locked(statement, bound_s: float = 30.0):
    """``statement()``, run again every 50 ms while SQLite says the database is locked, for at
    most ``bound_s`` seconds; any other error, or a lock that outlasts the bound, is raised."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
