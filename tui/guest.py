"""Run the head's Trio code in Trio's guest mode on Textual's asyncio loop.

Trio runs its tasks on the loop's thread between asyncio callbacks and waits for
I/O on a helper thread; ``stop`` cancels the Trio side and waits for it to end, or
that helper thread would stay blocked after the app exits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import outcome
import trio


class TrioGuest:
    """``fn(stop, task_status=...)`` in guest mode: ``start`` returns what it
    reports through ``task_status``; ``stop`` sets ``stop`` and waits for the end."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._scope: trio.CancelScope | None = None
        self._done: asyncio.Future[outcome.Outcome[None]] | None = None

    async def start(self) -> Any:
        """Raises:
        RuntimeError: the Trio side failed before it started.
        """
        loop = asyncio.get_running_loop()
        started: asyncio.Future[Any] = loop.create_future()
        self._done = done = loop.create_future()

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    value = await nursery.start(self._fn, self._stop)
                    if not started.done():
                        started.set_result(value)

        def finished(result: outcome.Outcome[None]) -> None:
            if not done.done():
                done.set_result(result)
            if not started.done():
                error = getattr(result, "error", None)
                started.set_exception(
                    RuntimeError(f"the head stopped before it started: {error!r}")
                )

        trio.lowlevel.start_guest_run(
            main,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=finished,
            host_uses_signal_set_wakeup_fd=True,
        )
        return await started

    async def stop(self, timeout: float = 10.0) -> None:
        done = self._done
        if done is None or done.done() or self._token is None:
            return
        stop, scope = self._stop, self._scope
        assert stop is not None and scope is not None
        try:
            self._token.run_sync_soon(stop.set)
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            self._token.run_sync_soon(scope.cancel)
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except trio.RunFinishedError:
            pass
        result = done.result()
        if isinstance(result, outcome.Error) and not isinstance(result.error, trio.Cancelled):
            raise result.error
