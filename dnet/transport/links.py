"""The ``Link`` seam and its in-memory implementation (the WebSocket one is in
``dnet.transport.websocket``).

A link moves whole binary messages and knows nothing of their contents. Closing
either end makes the other end's ``receive`` raise ``LinkClosed``.
"""

from __future__ import annotations

import math
from typing import Protocol

import trio

from dnet.errors import PeerUnavailable

# Prefill activations are chunked by the head, but one chunk can still be several
# MiB: far above the 1 MiB default of common WebSocket stacks.
MAX_MESSAGE_BYTES = 1 << 30
# Until a connection is authenticated only handshake messages (under 1 KiB) may come:
# a stranger cannot make a peer buffer more than this.
HANDSHAKE_MAX_BYTES = 64 << 10
RECEIVE_BUFFER_BYTES = 1 << 20


class LinkClosed(PeerUnavailable):
    """The other end went away (or this end was closed)."""

    code = "link_closed"


class Link(Protocol):
    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> bytes: ...

    async def aclose(self) -> None: ...

    def limit(self, max_message: int) -> None:
        """Refuse (close on) messages over ``max_message`` bytes from now on."""
        ...


class MemoryLink:
    """One end of an in-memory link pair (``memory_link_pair``)."""

    def __init__(
        self, send: trio.MemorySendChannel[bytes], receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        self._send = send
        self._receive = receive
        self.description = "memory"
        self._max_message = MAX_MESSAGE_BYTES

    def limit(self, max_message: int) -> None:
        self._max_message = max_message

    async def send(self, data: bytes) -> None:
        try:
            await self._send.send(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise LinkClosed("memory link closed") from exc

    async def receive(self) -> bytes:
        try:
            data = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise LinkClosed("memory link closed") from exc
        if len(data) > self._max_message:
            await self.aclose()
            raise LinkClosed(f"a message over {self._max_message} bytes")
        return data

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def memory_link_pair() -> tuple[MemoryLink, MemoryLink]:
    """Two connected in-memory links, for tests."""
    a_send, b_receive = trio.open_memory_channel[bytes](math.inf)
    b_send, a_receive = trio.open_memory_channel[bytes](math.inf)
    return MemoryLink(a_send, a_receive), MemoryLink(b_send, b_receive)
