"""PeerClient keeps replies matched to calls even when callers give up."""

from __future__ import annotations

import pytest
import trio

from dnet.errors import PeerUnavailable
from dnet.head.peers import PeerClient
from dnet.protocol.messages import Ping, Pong, Status, StatusRequest
from dnet.transport.connection import Connection
from dnet.transport.links import memory_link_pair


def _status(n: int) -> Status:
    return Status("p", f"reply-{n}", 1, 1, None, None, 0, n, 0.0)


async def test_a_caller_that_gives_up_does_not_shift_later_replies(autojump_clock):
    head_link, peer_link = memory_link_pair()
    head, peer = Connection(head_link, "p", "peer"), Connection(peer_link, "h", "head")
    client = PeerClient(head, "memory://peer")

    async def slow_peer() -> None:
        n = 0
        while True:
            message, payload = await peer.receive()
            n += 1
            if isinstance(message, Ping):
                await peer.send(Pong(message.seq, 0), payload)
            else:
                await trio.sleep(10 if n == 1 else 0)  # the first answer comes late
                await peer.send(_status(n))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.serve, lambda m: None, lambda c, why: None)
        nursery.start_soon(slow_peer)
        with pytest.raises(PeerUnavailable, match="did not answer"):
            await client.call(StatusRequest(), Status, timeout=1)
        with trio.move_on_after(2):  # cancelled, not timed out
            await client.call(StatusRequest(), Status)
        third = await client.call(StatusRequest(), Status, timeout=30)
        assert isinstance(third, Status) and third.name == "reply-3"
        await client.ping(b"x")  # pings stay matched too
        nursery.cancel_scope.cancel()
