"""Refusing strangers cheaply: a cap on the connections one source address may
hold, and a log that a flood of refused connections cannot flood."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Peers and heads hold a handful of connections to each other; a source with more
# than this is misbehaving, and the rest of the cluster must not pay for it.
MAX_CONNECTIONS_PER_SOURCE = 64


class TooManyConnections(Exception):
    pass


class SourceCaps:
    """Counts the open connections of each source address."""

    def __init__(self, limit: int = MAX_CONNECTIONS_PER_SOURCE) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    @contextmanager
    def hold(self, source: str) -> Iterator[None]:
        """Raises:
        TooManyConnections: ``source`` already holds ``limit`` connections.
        """
        if self._open[source] >= self.limit:
            raise TooManyConnections(f"{source} already holds {self.limit} connections")
        self._open[source] += 1
        try:
            yield
        finally:
            self._open[source] -= 1
            if not self._open[source]:
                del self._open[source]


class RateLimitedLog:
    """At most ``burst`` lines per ``window_s``; the next line after a quiet spell
    says how many were left out."""

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = 10,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._burst = burst
        self._window = window_s
        self._clock = clock
        self._start = -window_s
        self._count = 0
        self.suppressed = 0

    def __call__(self, level: int, msg: str, *args: object) -> None:
        now = self._clock()
        if now - self._start >= self._window:
            self._start, self._count = now, 0
        if self._count >= self._burst:
            self.suppressed += 1
            return
        self._count += 1
        if self.suppressed:
            msg += " (%d more like these were not logged)"
            args = (*args, self.suppressed)
            self.suppressed = 0
        self._log.log(level, msg, *args)
