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


async def test_our_client_against_trio_websocket_server_with_pings_and_close():
    from trio_websocket import serve_websocket as tw_serve

    async def echo(request):
        ws = await request.accept()
        await ws.ping(b"are you there")  # our link must answer while reading
        for _ in range(3):
            message = await ws.get_message()
            await ws.send_message(message)
        await ws.aclose(code=4000, reason="done")

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: tw_serve(
                echo, "127.0.0.1", 0, None, max_message_size=1 << 24, task_status=task_status
            )
        )
        link = await connect_websocket("127.0.0.1", server.port, "/", 5)
        for size in (0, 200, 3 << 20):
            payload = bytes(range(256)) * (size // 256)
            await link.send(payload)
            with trio.fail_after(10):
                assert await link.receive() == payload
        with pytest.raises(PeerUnavailable, match="closed the connection"), trio.fail_after(5):
            await link.receive()
        await link.aclose()
        nursery.cancel_scope.cancel()


async def test_a_protocol_violation_closes_that_connection_with_1002():
    async def handler(link):
        await link.receive()

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, "/x")
        async with open_websocket_url(f"ws://127.0.0.1:{port}/x") as ws:
            # An unmasked frame from a client breaks RFC 6455 section 5.1.
            await ws._stream.send_all(bytes((0x82, 0x01, 0x00)))
            with pytest.raises(Exception) as info, trio.fail_after(5):
                await ws.get_message()
            assert getattr(info.value, "reason", None) is not None
            assert info.value.reason.code == 1002
            await ws._stream.aclose()
        nursery.cancel_scope.cancel()
