"""Serve the app with hypercorn's Trio worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart_trio import QuartTrio

# An idle keep-alive connection holds a graceful shutdown for the whole timeout.
GRACEFUL_TIMEOUT_S = 1.0


async def serve_api(
    app: QuartTrio,
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until ``shutdown_trigger`` returns (then finish
    in-flight requests for up to ``GRACEFUL_TIMEOUT_S``) or the task is cancelled;
    reports the bound ``http://host:port`` through ``task_status``."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.keep_alive_timeout = 30
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"

    async def started(
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await serve(app, config, shutdown_trigger=shutdown_trigger, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(started)
        task_status.started(binds[0])
