"""Where the dashboard's figures come from: a ``StatusSource``. The real one follows
a head's API (its status stream, and device polls); tests give a fixed one, so the
screens render the same every time."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Protocol

import attrs

from tui.client import HeadClient, HeadError

HISTORY = 60  # tokens/s samples kept for the sparkline


@attrs.frozen
class Snapshot:
    """One look at the head: ``/v1/status``, ``/v1/devices``, and the tokens/s
    history (oldest first). ``error`` says why the head could not be read."""

    url: str
    status: dict[str, Any] = attrs.Factory(dict)
    devices: tuple[dict[str, Any], ...] = ()
    rates: tuple[float, ...] = ()
    error: str | None = None


class StatusSource(Protocol):
    url: str

    def watch(self) -> AsyncIterator[Snapshot]: ...

    async def logs(self, after: int) -> tuple[int, list[str]]: ...


class HttpStatusSource:
    """Follows a head: a new snapshot on every status event (the head pushes one
    per change and every second) and every ``devices_every_s`` for the peers."""

    def __init__(self, client: HeadClient, devices_every_s: float = 1.0) -> None:
        self.client = client
        self.url = client.base_url
        self._devices_every_s = devices_every_s
        self._rates: deque[float] = deque(maxlen=HISTORY)

    async def watch(self) -> AsyncIterator[Snapshot]:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def follow_status() -> None:
            while True:
                try:
                    async for status in self.client.status_stream():
                        queue.put_nowait(("status", status))
                except HeadError as exc:
                    queue.put_nowait(("error", str(exc)))
                await asyncio.sleep(1.0)  # then reconnect

        async def poll_devices() -> None:
            while True:
                try:
                    queue.put_nowait(("devices", await self.client.devices()))
                except HeadError as exc:
                    queue.put_nowait(("error", str(exc)))
                await asyncio.sleep(self._devices_every_s)

        tasks = [asyncio.create_task(follow_status()), asyncio.create_task(poll_devices())]
        status: dict[str, Any] = {}
        devices: tuple[dict[str, Any], ...] = ()
        try:
            while True:
                kind, value = await queue.get()
                error = None
                if kind == "status":
                    status = value
                    self._rates.append(float(value["head"]["tokens_per_s"]))
                elif kind == "devices":
                    devices = tuple(value)
                else:
                    error = value
                yield Snapshot(self.url, status, devices, tuple(self._rates), error)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def logs(self, after: int) -> tuple[int, list[str]]:
        try:
            return await self.client.logs(after)
        except HeadError:
            return after, []


class FixedStatusSource:
    """The same snapshot and log lines every time (tests, screenshots)."""

    def __init__(self, snapshot: Snapshot, log_lines: list[str] | None = None) -> None:
        self.url = snapshot.url
        self._snapshot = snapshot
        self._lines = list(log_lines or [])

    async def watch(self) -> AsyncIterator[Snapshot]:
        yield self._snapshot
        await asyncio.Event().wait()  # nothing ever changes

    async def logs(self, after: int) -> tuple[int, list[str]]:
        return len(self._lines), self._lines[after:]
