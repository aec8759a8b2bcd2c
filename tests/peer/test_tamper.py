"""A man in the middle who lets a real handshake through, then alters, injects or
replays a frame: the peer closes that connection and acts on nothing."""

from __future__ import annotations

import pytest
import trio

from dnet.head.cluster import open_cluster
from dnet.head.loading import PlanEntry
from dnet.identity import Identity, verify_signature
from dnet.protocol.codec import encode
from dnet.protocol.messages import StatusRequest, Unload
from dnet.transport.connection import open_connection
from dnet.transport.frames import OP_BINARY, FrameReader, encode_frame
from dnet.transport.links import LinkClosed

from ..processes import CLUSTER_KEY, open_peers

HANDSHAKE_MESSAGES = 2  # Hello, HelloFinish from the connecting side


async def _relay(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(1 << 16):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await sink.aclose()


async def _tamper(source: trio.SocketStream, sink: trio.SocketStream, mode: str) -> None:
    """Client to peer: pass the HTTP upgrade and the handshake, then tamper with
    the first message after it (re-framed: the proxy sees WebSocket messages)."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += await source.receive_some(4096)
    upgrade, _, rest = head.partition(b"\r\n\r\n")
    await sink.send_all(upgrade + b"\r\n\r\n")
    reader = FrameReader(masked=True, max_message=1 << 30)
    reader.receive_data(rest)
    seen = 0
    try:
        while True:
            while (frame := reader.next_message()) is None:
                data = await source.receive_some(1 << 16)
                if not data:
                    return
                reader.receive_data(data)
            opcode, message = frame
            outgoing = [message]
            if seen == HANDSHAKE_MESSAGES and opcode == OP_BINARY:
                if mode == "alter":
                    outgoing = [message[:-1] + bytes([message[-1] ^ 1])]
                elif mode == "inject":
                    outgoing = [encode(Unload()), message]
                elif mode == "replay":
                    outgoing = [message, message]
            seen += opcode == OP_BINARY
            for m in outgoing:
                await sink.send_all(encode_frame(opcode, m, mask=True))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await sink.aclose()


async def _serve_proxy(target: str, mode: str, *, task_status) -> None:
    host, port = target.removeprefix("ws://").split("/")[0].split(":")

    async def handle(client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream(host, int(port))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tamper, client, upstream, mode)
            nursery.start_soon(_relay, upstream, client)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/dnet/2")
    await trio.serve_listeners(handle, listeners)


@pytest.mark.parametrize("mode", ["alter", "inject", "replay"])
async def test_a_tampered_frame_closes_the_connection_and_is_never_acted_on(tiny_model, mode):
    path = tiny_model(arch="qwen3", layers=2)
    async with (
        open_peers(1) as peers,
        open_cluster([peers[0][0]], Identity.generate(), CLUSTER_KEY) as cluster,
        trio.open_nursery() as nursery,
    ):
        ring = await cluster.load(str(path), [PlanEntry(cluster.peers[0].peer_id, 0, 2)])
        proxy = await nursery.start(_serve_proxy, peers[0][0], mode)
        identity = Identity.generate()
        async with open_connection(proxy, identity, CLUSTER_KEY, verify_signature) as conn:
            # The handshake went through the proxy untouched; now the first frame.
            await conn.send(Unload() if mode == "alter" else StatusRequest())
            with trio.fail_after(5), pytest.raises(LinkClosed):
                while True:  # a replayed StatusRequest gets one answer, then the end
                    await conn.receive()
        # The peer kept its slice and serves the honest connection as before.
        status = (await ring.status())[0]
        assert status.layers == (0, 2), f"{mode}: the peer acted on a forged frame"
        nursery.cancel_scope.cancel()
