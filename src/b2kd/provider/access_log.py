"""The access log: one JSON object per request, written by a thread of its own.

The request path only puts the line on a bounded queue (stdlib ``logging``'s
QueueHandler); a QueueListener thread appends it to the file. A full queue or
a failed write (disk full, the file replaced by a directory) drops that record
and calls ``on_failure``, never the request. The file is reopened when it is
moved away (WatchedFileHandler), so log rotation needs no signal.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
from collections.abc import Callable
from pathlib import Path

QUEUE_SIZE = 10000  # records waiting for the writer before new ones are dropped


class _FileHandler(logging.handlers.WatchedFileHandler):
    def __init__(self, path: Path, on_failure: Callable[[], None]):
        super().__init__(path, delay=True)
        self.on_failure = on_failure

    def emit(self, record: logging.LogRecord) -> None:
        try:  # WatchedFileHandler's reopen raises out of emit; a raise here would end the listener
            super().emit(record)
        except Exception:  # noqa: BLE001 -- any write failure drops the record, nothing more
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.stream is not None:  # reopen on the next record: the path may be writable again
            try:
                self.stream.close()
            except OSError:
                pass
            self.stream = None
        self.on_failure()


class _QueueHandler(logging.handlers.QueueHandler):
    def __init__(self, q: queue.Queue, on_failure: Callable[[], None]):
        super().__init__(q)
        self.on_failure = on_failure

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # the message is already a line of JSON: nothing to format on the request path

    def handleError(self, record: logging.LogRecord) -> None:
        self.on_failure()


class AccessLog:
    """``write(record)`` from any thread; ``start``/``stop`` the writer (stop flushes)."""

    def __init__(self, path: str | Path | None, on_failure: Callable[[], None] = lambda: None):
        self.path = None if path is None else Path(path)
        self._listener, self._running = None, False
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        q: queue.Queue = queue.Queue(QUEUE_SIZE)
        # not logging.getLogger: an unregistered logger per app, so two apps never share handlers
        self._logger = logging.Logger("b2kd.access")  # noqa: LOG001
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(_QueueHandler(q, on_failure))
        self._listener = logging.handlers.QueueListener(q, _FileHandler(self.path, on_failure))

    def start(self) -> None:
        if self._listener is not None and not self._running:
            self._listener.start()
            self._running = True

    def stop(self) -> None:
        if self._running:
            self._running = False
            self._listener.stop()
            for handler in self._listener.handlers:
                handler.close()

    def write(self, record: dict) -> None:
        if self._listener is not None:
            self._logger.info(json.dumps(record, default=str))
