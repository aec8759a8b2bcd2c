"""Where a peer fetches the spans its store lacks: the Hugging Face hub (range
requests), other peers that hold them and the head that loads it (over
authenticated links, ``FetchSpan`` → ``SpanData`` pieces). Each is a ``Source``
the store reads in order. A peer serves other peers only runs of spans its store
has verified."""

from __future__ import annotations

import os
from contextlib import suppress
from typing import Any

import trio

from dnet.errors import DnetError, PeerUnavailable
from dnet.identity import Identity, verify_signature
from dnet.models.hub import stream_range
from dnet.peer.weights import FetchFailed, Sink, Source, WeightStore
from dnet.protocol.codec import ProtocolError
from dnet.protocol.messages import FetchSpan, Holder, HubSource, SpanData
from dnet.transport.connection import Connection, open_connection
from dnet.transport.links import LinkClosed

FETCH_TIMEOUT_S = 60.0  # for each piece of a span from the head or a peer
PIECE_BYTES = 4 << 20


def hub_source(hub: HubSource) -> Source:
    """Bytes of ``hub``'s files by range, read on a worker thread a chunk at a time
    (the store's writes pace it)."""

    async def fetch(name: str, begin: int, end: int, sink: Sink) -> None:
        def read() -> None:
            for chunk in stream_range(hub, name, begin, end):
                trio.from_thread.run(sink, chunk)

        await trio.to_thread.run_sync(read)

    return Source("hub", fetch)


def peer_source(
    holder: Holder, model_id: str, identity: Identity, cluster_key: bytes, name: str
) -> Source:
    """Bytes of ``model_id``'s files from another peer's store, over a link of
    their own (one per run)."""

    async def fetch(file: str, begin: int, end: int, sink: Sink) -> None:
        try:
            async with open_connection(
                holder.address,
                identity,
                cluster_key,
                verify_signature,
                expected_peer_id=holder.peer_id,
                name=name,
            ) as conn:
                await conn.send(FetchSpan(model_id, file, begin, end))
                expected = 0
                while True:
                    with trio.move_on_after(FETCH_TIMEOUT_S):
                        piece, data = await conn.receive()
                    if not isinstance(piece, SpanData):
                        raise FetchFailed(f"no part of {file} came in {FETCH_TIMEOUT_S:.0f}s")
                    if piece.error:
                        raise FetchFailed(f"it cannot send {file}: {piece.error}")
                    if piece.offset != expected or piece.begin != begin:
                        raise FetchFailed(f"{file}: a piece out of place at {piece.offset}")
                    await sink(data)
                    expected += len(data)
                    if piece.last:
                        return
        except (LinkClosed, ProtocolError) as exc:
            raise FetchFailed(f"the link broke: {exc}") from None
        except DnetError as exc:
            if isinstance(exc, FetchFailed):
                raise
            raise FetchFailed(exc.message) from None

    return Source(f"peer {holder.name or holder.peer_id[:12]}", fetch)


async def serve_span(store: WeightStore, conn: Connection, message: FetchSpan) -> None:
    """Send another peer a run of spans this store holds, verified, in pieces; a
    range that is not one gets an error it reports."""
    path = store.run_path(message.model_id, message.file, message.begin, message.end)
    if path is None:
        await _piece(conn, message, 0, b"", "this peer does not hold those bytes")
        return
    size, offset = message.end - message.begin, 0
    with path.open("rb") as f:
        while offset < size:
            n = min(PIECE_BYTES, size - offset)
            data = await trio.to_thread.run_sync(os.pread, f.fileno(), n, message.begin + offset)
            if len(data) != n:
                await _piece(conn, message, offset, b"", f"{message.file} is shorter")
                return
            offset += n
            if not await _piece(conn, message, offset - n, data, "", offset >= size):
                return


async def _piece(
    conn: Connection, message: FetchSpan, offset: int, data: bytes, error: str, last: bool = True
) -> bool:
    piece = SpanData(message.model_id, message.file, message.begin, offset, last, error)
    try:
        await conn.send(piece, data)
    except LinkClosed:
        return False
    return True


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
