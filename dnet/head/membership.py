"""Keep a cluster's membership in step with discovery: connect to peers as they are
found (the handshake proves the id they advertised), log those that leave."""

from __future__ import annotations

import logging

import trio

from dnet.discovery import PeerFound, PeerLost
from dnet.errors import DnetError
from dnet.head.cluster import Cluster
from dnet.head.peers import PeerClient

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 8.0


async def follow_discovery(
    cluster: Cluster, events: trio.MemoryReceiveChannel[PeerFound | PeerLost]
) -> None:
    """Run until ``events`` closes or the task is cancelled. Peers are dialled
    side by side, so one that hangs delays no other. An address that keeps failing
    is logged as a warning once, then quietly until it works, and is dialled again
    only after a backoff (1 s, doubling up to ``MAX_BACKOFF_S``)."""
    failing: dict[str, tuple[float, float]] = {}  # address -> (next try, backoff)
    dialling: set[tuple[str, str | None]] = set()  # (address, claimed id)

    async def add(event: PeerFound) -> None:
        try:
            await cluster.connect(event.address, event.peer_id)
        except DnetError as exc:
            level = logging.DEBUG if event.address in failing else logging.WARNING
            log.log(level, "could not add %s: %s", event.address, exc.message)
            backoff = min(failing.get(event.address, (0.0, 0.5))[1] * 2, MAX_BACKOFF_S)
            failing[event.address] = (trio.current_time() + backoff, backoff)
        else:
            failing.pop(event.address, None)
        finally:
            dialling.discard((event.address, event.peer_id))

    async with trio.open_nursery() as nursery:
        async for event in events:
            if isinstance(event, PeerLost):
                log.info("peer %s left (%s goodbye)", event.peer_id[:12], event.source)
                continue
            # The same peer again: nothing to do. The same id at another address is
            # tried, so that a clone is caught by the handshake and reported.
            if (event.address, event.peer_id) in dialling or any(
                p.address == event.address and p.alive for p in cluster.peers
            ):
                continue
            if trio.current_time() < failing.get(event.address, (0.0, 0.0))[0]:
                continue  # failed lately: wait out its backoff (1 s, doubling)
            log.log(
                logging.DEBUG if event.address in failing else logging.INFO,
                "found %s (%s) at %s via %s",
                event.name or "peer",
                (event.peer_id or "?")[:12],
                event.address,
                event.source,
            )
            dialling.add((event.address, event.peer_id))
            nursery.start_soon(add, event)


async def serve_health_checks(
    cluster: Cluster, interval_s: float = 2.0, timeout_s: float = 3.0
) -> None:
    """Ping every peer each ``interval_s``, all at once; a peer that does not
    answer within ``timeout_s`` is disconnected (its sessions fail, it leaves
    ``cluster.peers``). A ping waits behind a control call in flight on its connection
    (a long load), so a busy peer is never taken for a dead one."""

    async def check(peer: PeerClient) -> None:
        try:
            await peer.ping(timeout=timeout_s)
        except DnetError as exc:
            log.warning("peer %s failed its health check: %s", peer.label, exc.message)
            peer.gone_why = f"is not responding (no answer to a ping in {timeout_s:.0f} s)"
            await peer.conn.aclose()

    while True:
        await trio.sleep(interval_s)
        async with trio.open_nursery() as nursery:
            for peer in list(cluster.peers):
                nursery.start_soon(check, peer)
