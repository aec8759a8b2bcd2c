"""Discovery events drive the ring's membership; claims are checked by handshake."""

from __future__ import annotations

import trio

from dnet.discovery import PeerFound, PeerLost
from dnet.head.cluster import open_cluster
from dnet.head.membership import follow_discovery
from dnet.identity import Identity
from dnet.peer.daemon import PeerDaemon
from dnet.runtime.compute import open_compute_thread

from ..processes import CLUSTER_KEY, open_peers


async def test_found_peers_join_and_false_claims_are_refused():
    async with (
        open_peers(2) as peers,
        open_cluster([], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        send, receive = trio.open_memory_channel(10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_discovery, cluster, receive)
            (a, da), (b, db) = peers
            await send.send(PeerFound(a, da.peer_id, "p0", "memory"))
            await send.send(PeerFound(b, Identity.generate().peer_id, "liar", "memory"))  # wrong id
            await send.send(PeerFound(b, db.peer_id, "p1", "memory"))
            await send.send(PeerFound(a, da.peer_id, "p0", "memory"))  # again: no second link
            await send.send(PeerLost(db.peer_id, "memory"))
            with trio.fail_after(5):
                await cluster.wait_peers(2)
            await trio.sleep(0.1)
            assert sorted(p.peer_id for p in cluster.peers) == sorted([da.peer_id, db.peer_id])
            nursery.cancel_scope.cancel()


async def test_two_live_peers_with_one_identity_are_reported():
    clone = Identity.generate()
    async with (
        open_compute_thread() as c1,
        open_compute_thread() as c2,
        trio.open_nursery() as nursery,
        open_cluster([], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        ports = [
            await nursery.start(
                PeerDaemon(clone, CLUSTER_KEY, c, name=f"clone{i}").run, "127.0.0.1", 0
            )
            for i, c in enumerate((c1, c2))
        ]
        send, receive = trio.open_memory_channel(10)
        nursery.start_soon(follow_discovery, cluster, receive)
        for port in ports:
            await send.send(
                PeerFound(f"ws://127.0.0.1:{port}/dnet/2", clone.peer_id, "clone", "memory")
            )
        with trio.fail_after(5):
            while not cluster.duplicates:
                await trio.sleep(0.01)
        assert len(cluster.peers) == 1
        assert cluster.duplicates[0][0] == clone.peer_id
        nursery.cancel_scope.cancel()


async def test_a_static_peer_that_starts_late_is_joined(autojump_clock):
    # A free port now; the peer starts there only after the head has tried it.
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    from dnet.head.service import open_coordinator

    async with (
        open_compute_thread() as compute,
        trio.open_nursery() as nursery,
        open_coordinator(
            Identity.generate(),
            CLUSTER_KEY,
            static_peers=[f"127.0.0.1:{port}"],
            redial_interval_s=10,
        ) as coordinator,
    ):
        await trio.sleep(1)
        assert coordinator.cluster.peers == []
        daemon = PeerDaemon(Identity.generate(), CLUSTER_KEY, compute, name="late")
        await nursery.start(daemon.run, "127.0.0.1", port)
        with trio.fail_after(30):
            await coordinator.cluster.wait_peers(1)
        assert coordinator.cluster.peers[0].peer_id == daemon.peer_id
        nursery.cancel_scope.cancel()


async def test_a_peer_that_hangs_does_not_delay_the_others():
    async def tarpit(stream):  # accepts, then never answers the WebSocket upgrade
        await trio.sleep_forever()

    async with (
        open_peers(1) as peers,
        open_cluster([], Identity.generate(), CLUSTER_KEY) as cluster,
        trio.open_nursery() as nursery,
    ):
        listeners = await nursery.start(trio.serve_tcp, tarpit, 0)
        port = listeners[0].socket.getsockname()[1]
        send, receive = trio.open_memory_channel(10)
        nursery.start_soon(follow_discovery, cluster, receive)
        ((address, daemon),) = peers
        await send.send(PeerFound(f"ws://127.0.0.1:{port}/dnet/2", None, "tarpit", "memory"))
        await send.send(PeerFound(address, daemon.peer_id, "p0", "memory"))
        with trio.fail_after(3):  # dialling the tarpit alone takes 10 s to give up
            await cluster.wait_peers(1)
        assert cluster.peers[0].peer_id == daemon.peer_id
        nursery.cancel_scope.cancel()
