"""Where a peer fetches the spans its store lacks: the head that loads it (over
the authenticated link, ``FetchSpan`` → ``SpanData`` pieces) and the Hugging Face
hub (range requests). Each is a ``Source`` the store reads in order."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import trio

from dnet.errors import PeerUnavailable
from dnet.models.hub import stream_range
from dnet.peer.weights import FetchFailed, Sink, Source
from dnet.protocol.messages import FetchSpan, HubSource, SpanData
from dnet.transport.connection import Connection

FETCH_TIMEOUT_S = 60.0  # for each piece of a span from the head


def hub_source(hub: HubSource) -> Source:
    """Bytes of ``hub``'s files by range, read on a worker thread a chunk at a time
    (the store's writes pace it)."""

    async def fetch(name: str, begin: int, end: int, sink: Sink) -> None:
        def read() -> None:
            for chunk in stream_range(hub, name, begin, end):
                trio.from_thread.run(sink, chunk)

        await trio.to_thread.run_sync(read)

    return Source("hub", fetch)


class SpanFetches:
    """Fetches under way over head connections: each sends ``FetchSpan`` and reads
    its pieces from a small queue the connection's reader fills (so a slow disk
    slows the head down, not memory up)."""

    def __init__(self) -> None:
        self._waiting: dict[
            tuple[str, str, int], tuple[Connection, trio.MemorySendChannel[Any]]
        ] = {}

    async def deliver(self, conn: Connection, piece: SpanData, data: bytes) -> None:
        waiter = self._waiting.get((piece.model_id, piece.file, piece.begin))
        if waiter is not None and waiter[0] is conn:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await waiter[1].send((piece, data))

    def close(self, conn: Connection) -> None:
        for waiting_conn, pieces in list(self._waiting.values()):
            if waiting_conn is conn:
                pieces.close()

    def source(self, conn: Connection | None, model_id: str) -> Source:
        """Bytes of ``model_id``'s files from the head on ``conn``, piece by piece."""

        async def fetch(name: str, begin: int, end: int, sink: Sink) -> None:
            if conn is None or conn.closed:
                raise PeerUnavailable("the head that loads this slice went away")
            key = (model_id, name, begin)
            send, receive = trio.open_memory_channel[Any](4)
            self._waiting[key] = (conn, send)
            try:
                await conn.send(FetchSpan(model_id, name, begin, end))
                expected = 0
                while True:
                    piece, data = await _next_piece(receive, name)
                    if piece.offset != expected:
                        raise FetchFailed(f"{name}: a piece out of place at {piece.offset}")
                    await sink(data)
                    expected += len(data)
                    if piece.last:
                        return
            finally:
                del self._waiting[key]

        return Source("head", fetch)


async def _next_piece(receive: trio.MemoryReceiveChannel[Any], name: str) -> tuple[SpanData, bytes]:
    """Raises:
    PeerUnavailable (the head went away), FetchFailed (it said no, or went quiet)
    """
    with trio.move_on_after(FETCH_TIMEOUT_S):
        try:
            piece, data = await receive.receive()
        except trio.EndOfChannel:
            raise PeerUnavailable(f"the head went away while sending {name}") from None
        if piece.error:
            raise FetchFailed(f"the head cannot send {name}: {piece.error}")
        return piece, data
    raise FetchFailed(f"no part of {name} came in {FETCH_TIMEOUT_S:.0f}s")
