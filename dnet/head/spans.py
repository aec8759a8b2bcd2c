"""The head sends peers the weights they ask for while it loads them: only spans
named in a manifest it registered (a model file's header, a tensor's bytes, a small
file), never an arbitrary range or file, in pieces, so memory stays bounded."""

from __future__ import annotations

import logging
import os
from contextlib import suppress
from pathlib import Path

import trio

from dnet.errors import PeerUnavailable
from dnet.head.peers import PeerClient
from dnet.models.manifest import Manifest
from dnet.models.model_dir import ModelDir
from dnet.protocol.messages import FetchSpan, SpanData

log = logging.getLogger(__name__)

PIECE_BYTES = 4 << 20


class SpanServer:
    def __init__(self) -> None:
        self._models: dict[str, tuple[ModelDir, Manifest]] = {}

    def register(self, model: ModelDir, manifest: Manifest) -> None:
        self._models[manifest.model_id] = (model, manifest)

    def forget(self, model_id: str) -> None:
        self._models.pop(model_id, None)

    def _path(self, message: FetchSpan) -> Path:
        """The file to read, if the span is one the manifest names.

        Raises:
            LookupError
        """
        model, manifest = self._models[message.model_id]
        file = manifest.file(message.file)
        # A run of whole spans: from one's beginning to one's end, each held here.
        inside = [s for s in file.spans if message.begin <= s.begin and s.end <= message.end]
        if (
            not inside
            or inside[0].begin != message.begin
            or inside[-1].end != message.end
            or not all(s.sha256 for s in inside)
        ):
            raise LookupError(f"no span [{message.begin}, {message.end}) in {message.file}")
        return model.path if model.is_gguf else model.path / file.name

    async def send(self, peer: PeerClient, message: FetchSpan) -> None:
        """Send one span to ``peer``; a span the head does not serve gets an error
        the peer reports."""
        try:
            path = self._path(message)
        except (KeyError, LookupError, StopIteration):
            await self._reply(peer, message, 0, b"", "not a span of a model this head is loading")
            return
        offset, size = 0, message.end - message.begin
        fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
        try:
            while True:
                n = min(PIECE_BYTES, size - offset)
                data = await trio.to_thread.run_sync(os.pread, fd, n, message.begin + offset)
                if len(data) != n:
                    await self._reply(peer, message, offset, b"", f"{message.file} is shorter")
                    return
                last = offset + n >= size
                if not await self._reply(peer, message, offset, data, "", last):
                    return
                offset += n
                if last:
                    return
        finally:
            os.close(fd)

    async def _reply(
        self,
        peer: PeerClient,
        message: FetchSpan,
        offset: int,
        data: bytes,
        error: str,
        last: bool = True,
    ) -> bool:
        piece = SpanData(message.model_id, message.file, message.begin, offset, last, error)
        with suppress(PeerUnavailable):
            await peer.send(piece, data)
            return True
        log.info("peer %s went away while fetching %s", peer.label, message.file)
        return False
