"""SQLite's at-once "database is locked" (a lock deadlock it refuses) is retried, within a bound."""

from __future__ import annotations

import sqlite3
import time

import pytest

from b2kd.core.sqlite_lock import while_locked


def test_retries_a_lock_refusal_until_the_statement_runs():
    calls = []

    def statement():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "done"

    assert while_locked(statement) == "done" and len(calls) == 3


def test_other_errors_are_raised_at_once():
    calls = []

    def statement():
        calls.append(1)
        raise sqlite3.OperationalError("no such table: queries")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        while_locked(statement)
    assert len(calls) == 1


def test_a_lock_that_outlasts_the_bound_is_raised():
    def statement():
        raise sqlite3.OperationalError("database is locked")

    start = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        while_locked(statement, bound_s=0.2)
    assert 0.2 <= time.monotonic() - start < 2.0
