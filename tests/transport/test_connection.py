"""The handshake pump over the in-memory link: no sockets, virtual time."""

from __future__ import annotations

import pytest
import trio

from dnet.identity import Identity, verify_signature
from dnet.protocol.handshake import HandshakeFailed
from dnet.protocol.messages import StatusRequest
from dnet.transport.connection import client_handshake, server_handshake
from dnet.transport.links import LinkClosed, memory_link_pair

KEY = b"k" * 32


async def test_handshake_then_messages_over_memory_links():
    a, b = memory_link_pair()
    client_id, server_id = Identity.generate(), Identity.generate()
    result = {}

    async def serve():
        result["server"] = await server_handshake(b, server_id, KEY, verify_signature, name="s")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = await client_handshake(
            a, client_id, KEY, verify_signature, expected_peer_id=server_id.peer_id
        )
    server = result["server"]
    assert client.remote_peer_id == server_id.peer_id and server.remote_peer_id == client_id.peer_id
    await client.send(StatusRequest())
    assert await server.receive() == (StatusRequest(), b"")
    await client.aclose()
    with pytest.raises(LinkClosed):
        await server.receive()


async def test_a_failed_handshake_tells_why_and_closes():
    a, b = memory_link_pair()

    async def serve():
        # The client catches the wrong key first and says so; the server learns why.
        with pytest.raises(HandshakeFailed, match="refused: wrong cluster key"):
            await server_handshake(b, Identity.generate(), b"x" * 32, verify_signature)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        with pytest.raises(HandshakeFailed, match="cluster key"):
            await client_handshake(a, Identity.generate(), KEY, verify_signature)


async def test_a_silent_peer_times_the_handshake_out(autojump_clock):
    a, b = memory_link_pair()
    with pytest.raises(HandshakeFailed, match="timed out"):
        await client_handshake(a, Identity.generate(), KEY, verify_signature)
    # The hello was sent; then the link was closed.
    frame = await b.receive()
    assert frame
    with pytest.raises(LinkClosed):
        await b.receive()
