"""The head as a running service: a coordinator whose cluster follows discovery
(static addresses and mDNS), with health checks and recovery running beside it."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from dnet.discovery import PeerFound, PeerLost
from dnet.head.cluster import open_cluster
from dnet.head.coordinator import Coordinator
from dnet.head.membership import follow_discovery, serve_health_checks
from dnet.head.recovery import serve_recovery
from dnet.identity import Identity


@asynccontextmanager
async def open_coordinator(
    identity: Identity,
    cluster_key: bytes,
    *,
    static_peers: Sequence[str] = (),
    mdns_interfaces: Sequence[str] = (),
    max_concurrent: int = 64,
    context: int = 4096,
    compute_dtype: str | None = None,
    decode_lanes: int | None = None,
    health_interval_s: float = 2.0,
    redial_interval_s: float = 1.0,
    cache_dir: Path | None = None,
) -> AsyncIterator[Coordinator]:
    """A coordinator whose cluster follows discovery: the static addresses (dialled
    again every ``redial_interval_s`` while down) and, when ``mdns_interfaces`` are
    given, peers advertised over mDNS on them. ``cache_dir`` keeps the manifests of
    models, so each is hashed once."""
    from dnet.discovery.static import announce_static, redial_static

    async with (
        open_cluster(
            [], identity, cluster_key, decode_lanes=decode_lanes, cache_dir=cache_dir
        ) as cluster,
        trio.open_nursery() as nursery,
    ):
        coordinator = Coordinator(
            cluster, max_concurrent=max_concurrent, context=context, compute_dtype=compute_dtype
        )
        send, receive = trio.open_memory_channel[PeerFound | PeerLost](math.inf)
        nursery.start_soon(follow_discovery, cluster, receive)
        if mdns_interfaces:
            from dnet.discovery.mdns import browse

            await nursery.start(browse, list(mdns_interfaces), send.clone())
        await announce_static(static_peers, send)
        if static_peers:
            nursery.start_soon(redial_static, list(static_peers), send, redial_interval_s)
        nursery.start_soon(serve_health_checks, cluster, health_interval_s)
        nursery.start_soon(serve_recovery, coordinator)
        try:
            yield coordinator
        finally:
            nursery.cancel_scope.cancel()


async def wait_for_peers(coordinator: Coordinator, count: int, timeout_s: float) -> int:
    """Wait until ``count`` peers are connected, or ``timeout_s``; the number connected."""
    with trio.move_on_after(timeout_s):
        await coordinator.cluster.wait_peers(count)
    return len(coordinator.cluster.peers)
