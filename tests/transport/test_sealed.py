"""Sealed links (dnet.transport.sealed): counters stay in step when senders are
cancelled."""

from __future__ import annotations

import os

import pytest
import trio

from dnet.transport import sealed
from dnet.transport.links import LinkClosed, memory_link_pair
from dnet.transport.sealed import SealedLink


class SlowLink:
    """A link whose sends wait for ``release`` (a socket whose buffer is full)."""

    def __init__(self, link):
        self.link, self.release = link, trio.Event()
        self.description = "slow"
        self.closed = False

    async def send(self, data):
        await self.release.wait()
        await self.link.send(data)

    async def aclose(self):
        self.closed = True
        await self.link.aclose()


def _pair(wrap=lambda link: link):
    a, b = memory_link_pair()
    k1, k2 = os.urandom(32), os.urandom(32)
    slow = wrap(a)
    return slow, SealedLink(slow, k1, k2), SealedLink(b, k2, k1)


async def test_a_send_cancelled_under_way_still_goes_out_whole():
    # Cancelling a sender whose frame had taken its counter used to drop that
    # frame: every later one then failed to open ("not authentic").
    slow, mine, theirs = _pair(SlowLink)
    sender = trio.CancelScope()

    async def send_first():
        with sender:
            await mine.send(b"first")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_first)
        await trio.sleep(0.05)
        sender.cancel()  # while the link holds the frame back
        await trio.sleep(0.05)
        slow.release.set()
    await mine.send(b"second")
    with trio.fail_after(1):
        assert [await theirs.receive() for _ in range(2)] == [b"first", b"second"]


async def test_a_send_stuck_past_the_timeout_closes_the_link(monkeypatch):
    monkeypatch.setattr(sealed, "SEND_TIMEOUT_S", 0.1)
    slow, mine, _ = _pair(SlowLink)
    with pytest.raises(LinkClosed, match="timed out"):
        await mine.send(b"never taken")
    assert slow.closed
