"""Static peer lists feed the same seam as mDNS."""

from __future__ import annotations

import pytest
import trio

from dnet.discovery import PeerFound
from dnet.discovery.static import (
    BadPeerAddress,
    announce_static,
    parse_peer_address,
    read_peers_file,
)
from dnet.head.cluster import open_cluster
from dnet.head.membership import follow_discovery, serve_health_checks
from dnet.identity import Identity

from ..processes import CLUSTER_KEY, open_peers


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("127.0.0.1:9001", "ws://127.0.0.1:9001/dnet/2"),
        ("pi.local:80", "ws://pi.local:80/dnet/2"),
        ("[::1]:9002", "ws://[::1]:9002/dnet/2"),
        ("ws://10.0.0.5:7000/dnet/2", "ws://10.0.0.5:7000/dnet/2"),
    ],
)
def test_addresses(text, url):
    assert parse_peer_address(text) == url


@pytest.mark.parametrize(
    "text", ["nohost", "host:", "host:notaport", "http://h:1/", ":9000", "h:99999"]
)
def test_bad_addresses(text):
    with pytest.raises(BadPeerAddress):
        parse_peer_address(text)


def test_peers_file(tmp_path):
    f = tmp_path / "peers"
    f.write_text("# my cluster\n127.0.0.1:9001\n\n  10.0.0.2:9002  # the laptop\n")
    assert read_peers_file(f) == ["ws://127.0.0.1:9001/dnet/2", "ws://10.0.0.2:9002/dnet/2"]
    f.write_text("127.0.0.1:9001\nbroken\n")
    with pytest.raises(BadPeerAddress, match=":2:"):
        read_peers_file(f)
    with pytest.raises(BadPeerAddress):
        read_peers_file(tmp_path / "missing")


async def test_static_peers_join_through_the_discovery_seam():
    async with (
        open_peers(2) as peers,
        open_cluster([], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        send, receive = trio.open_memory_channel[PeerFound](10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_discovery, cluster, receive)
            await announce_static(
                [a.removeprefix("ws://").removesuffix("/dnet/2") for a, _ in peers], send
            )
            with trio.fail_after(5):
                await cluster.wait_peers(2)
            assert {p.peer_id for p in cluster.peers} == {d.peer_id for _, d in peers}
            nursery.cancel_scope.cancel()


async def test_health_checks_drop_a_silent_peer():
    # A "peer" that completes the handshake and then never answers anything.
    from dnet.identity import verify_signature
    from dnet.transport.connection import serve_connections

    async def mute(conn):
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            serve_connections,
            mute,
            "127.0.0.1",
            0,
            Identity.generate(),
            CLUSTER_KEY,
            verify_signature,
        )
        async with open_cluster(
            [f"ws://127.0.0.1:{port}/dnet/2"], Identity.generate(), CLUSTER_KEY
        ) as cluster:
            assert len(cluster.peers) == 1
            # Real time, not a virtual clock: the link is a real socket.
            nursery.start_soon(serve_health_checks, cluster, 0.2, 0.5)
            with trio.fail_after(5):
                while cluster.peers:
                    await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
