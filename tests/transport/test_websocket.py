"""The lean WebSocket link: interoperates, survives a crashing handler, rejects paths."""

from __future__ import annotations

import pytest
import trio
from trio_websocket import open_websocket_url

from dnet.errors import PeerUnavailable
from dnet.transport.websocket import connect_websocket, serve_websocket


async def test_a_failing_handler_does_not_take_the_listener_down(caplog):
    calls = 0

    async def handler(link):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug met by one connection")
        await link.send(await link.receive())

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, "/x")
        first = await connect_websocket("127.0.0.1", port, "/x", 5)
        with pytest.raises(PeerUnavailable):
            await first.receive()  # the server closed it
        await first.aclose()
        # A standard client (trio-websocket) still gets served, large messages too.
        async with open_websocket_url(f"ws://127.0.0.1:{port}/x", max_message_size=1 << 24) as ws:
            await ws.send_message(bytes(3 << 20))
            assert len(await ws.get_message()) == 3 << 20
            await ws.aclose()
            await ws._stream.aclose()  # trio-websocket 0.12 leaks it otherwise
        with pytest.raises(PeerUnavailable, match="refused"):
            await connect_websocket("127.0.0.1", port, "/elsewhere", 5)
        nursery.cancel_scope.cancel()
    assert "a bug met by one connection" in caplog.text
