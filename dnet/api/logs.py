"""The head's recent log lines, kept for ``GET /v1/logs`` (the console's log pane
reads them over HTTP, from a local or a remote head alike)."""

from __future__ import annotations

import logging
import threading
from collections import deque

MAX_LINES = 2000


class LogBuffer(logging.Handler):
    """A logging handler keeping the last ``MAX_LINES`` formatted lines, numbered."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._lines: deque[tuple[int, str]] = deque(maxlen=MAX_LINES)
        self._next = 0
        self._guard = threading.Lock()  # records may come from worker threads

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a bad record must not break the logger
            self.handleError(record)
            return
        with self._guard:
            self._lines.append((self._next, line))
            self._next += 1

    def after(self, seq: int) -> tuple[int, list[str]]:
        """The lines numbered ``seq`` and later, and the number to ask for next."""
        with self._guard:
            return self._next, [line for n, line in self._lines if n >= seq]
