"""The weights a peer holds, by content: ``<root>/<model id>/<file>``, each file
sparse (only the spans this peer's slices read), and ``have.json``, the spans
verified there. A load names spans by hash; whatever is missing, or no longer
matches its hash, is fetched (from the head, in pieces written straight to disk)
and checked before it is used. An interrupted fetch resumes with the spans still
missing; a second load of the same slice fetches nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

import trio

from dnet.errors import DnetError, InvalidModel, PeerUnavailable
from dnet.protocol.messages import FetchSpan, FileSpans, Span, SpanData
from dnet.transport.connection import Connection

log = logging.getLogger(__name__)

MODEL_ID = re.compile(r"^dm[0-9a-f]{40}$")
MAX_FILE_BYTES = 1 << 40
HASH_BLOCK = 8 << 20
FETCH_TIMEOUT_S = 60.0  # for each piece of a span from the head

Fetch = Callable[[str, Span], AsyncIterator[tuple[SpanData, bytes]]]


class FetchFailed(DnetError):
    code = "fetch_failed"


def _check(model_id: str, files: Sequence[FileSpans]) -> None:
    """Raises:
    InvalidModel: names or ranges no model has (a peer writes only inside its store).
    """
    if not MODEL_ID.match(model_id):
        raise InvalidModel(f"{model_id!r} is not a model id")
    if not files:
        raise InvalidModel("a slice must name the spans of the model files it reads")
    for f in files:
        if Path(f.name).name != f.name or f.name in ("", ".", "..") or f.name == "have.json":
            raise InvalidModel(f"{f.name!r} is not a model file name")
        if not 0 < f.size <= MAX_FILE_BYTES:
            raise InvalidModel(f"{f.name}: a size of {f.size} bytes")
        for s in f.spans:
            if not 0 <= s.begin <= s.end <= f.size:
                raise InvalidModel(f"{f.name}: a span [{s.begin}, {s.end}) outside the file")


def hash_range(path: Path, begin: int, end: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(begin)
        left = end - begin
        while left and (block := f.read(min(left, HASH_BLOCK))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


class WeightStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.fetched_bytes = 0  # over this process's life

    def _have(self, directory: Path) -> set[tuple[str, int, int, str]]:
        try:
            return {tuple(x) for x in json.loads((directory / "have.json").read_text())}
        except (OSError, ValueError, TypeError):
            return set()

    def _save(self, directory: Path, have: set[tuple[str, int, int, str]]) -> None:
        tmp = directory / f"have.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(sorted(have)))
        tmp.replace(directory / "have.json")

    async def ensure(
        self, model_id: str, files: Sequence[FileSpans], fetch: Fetch, *, headers_only: bool = False
    ) -> Path:
        """The directory holding every span of ``files`` (``headers_only``: just the
        headers and small files), verified; what was missing or corrupt is fetched
        first.

        Raises:
            InvalidModel, FetchFailed, PeerUnavailable (the head went away)
        """
        _check(model_id, files)
        directory = self.root / model_id
        await trio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
        have = self._have(directory)
        for f in files:
            path = directory / f.name
            if not path.exists() or path.stat().st_size != f.size:
                with path.open("wb") as out:  # sparse: holes where other slices' bytes go
                    out.truncate(f.size)
                have = {h for h in have if h[0] != f.name}
            for span in f.spans:
                if headers_only and span.name:
                    continue
                key = (f.name, span.begin, span.end, span.sha256)
                if key in have:
                    found = await trio.to_thread.run_sync(hash_range, path, span.begin, span.end)
                    if found == span.sha256:
                        continue
                    log.warning("%s of %s changed on disk: fetching it again", span, f.name)
                    have.discard(key)
                await self._fetch(path, f.name, span, fetch)
                have.add(key)
                await trio.to_thread.run_sync(self._save, directory, have)
        return directory

    async def _fetch(self, path: Path, name: str, span: Span, fetch: Fetch) -> None:
        digest = hashlib.sha256()
        expected = span.begin
        fd = os.open(path, os.O_WRONLY)
        try:
            async for piece, data in fetch(name, span):
                if piece.offset != expected - span.begin or expected + len(data) > span.end:
                    raise FetchFailed(f"{name}: a piece out of place at {piece.offset}")
                await trio.to_thread.run_sync(os.pwrite, fd, data, expected)
                digest.update(data)
                expected += len(data)
                self.fetched_bytes += len(data)
        finally:
            os.close(fd)
        if expected != span.end or digest.hexdigest() != span.sha256:
            raise FetchFailed(
                f"{name}: the bytes [{span.begin}, {span.end}) that came do not match their hash"
            )


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

    def fetcher(self, conn: Connection | None, model_id: str) -> Fetch:
        """Spans of ``model_id`` from the head on ``conn``, piece by piece."""

        async def fetch(name: str, span: Span) -> AsyncIterator[tuple[SpanData, bytes]]:
            if conn is None or conn.closed:
                raise PeerUnavailable("the head that loads this slice went away")
            key = (model_id, name, span.begin)
            send, receive = trio.open_memory_channel[Any](4)
            self._waiting[key] = (conn, send)
            try:
                await conn.send(FetchSpan(model_id, name, span.begin, span.end))
                while True:
                    piece, data = await _next_piece(receive, name)
                    yield piece, data
                    if piece.last:
                        return
            finally:
                del self._waiting[key]

        return fetch


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
