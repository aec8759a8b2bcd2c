"""Fixtures for rings of peers over real loopback WebSockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from dnet.identity import Identity
from dnet.peer.daemon import PeerDaemon
from dnet.runtime.compute import open_compute_thread

from ..processes import CLUSTER_KEY, LINE, PeerProcess

__all__ = ["CLUSTER_KEY", "LINE", "PeerProcess", "open_peers"]


@asynccontextmanager
async def open_peers(
    n: int, *, key: bytes = CLUSTER_KEY, idle_timeout: float = 600.0, max_memory: int | None = None
) -> AsyncIterator[list[tuple[str, PeerDaemon]]]:
    """``n`` peer daemons in this Trio process, each with its own compute thread
    (and ``max_memory``, their ``--max-memory``)."""
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        peers = []
        for i in range(n):
            compute = await stack.enter_async_context(open_compute_thread(f"compute-{i}"))
            daemon = PeerDaemon(
                Identity.generate(),
                key,
                compute,
                name=f"p{i}",
                request_idle_timeout_s=idle_timeout,
                max_memory=max_memory,
            )
            port = await nursery.start(daemon.run, "127.0.0.1", 0)
            peers.append((f"ws://127.0.0.1:{port}/dnet/1", daemon))
        try:
            yield peers
        finally:
            nursery.cancel_scope.cancel()


@pytest.fixture
def peer_processes(tmp_path):
    started: list[PeerProcess] = []
    key_file = tmp_path / "cluster.key"
    key_file.write_text(CLUSTER_KEY.hex())

    def start(n: int) -> list[PeerProcess]:
        for _i in range(n):
            started.append(
                PeerProcess(tmp_path / f"state{len(started)}", key_file, f"sp{len(started)}")
            )
        return started[-n:]

    yield start
    for p in started:
        p.stop()
