"""Server-sent event streams: a generation's chunks, and a body that, when closed
(the client went, or the stream ended), ends the generation on every peer and
frees its slot."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, aclosing
from typing import Any

import trio
from quart import Response

from dnet.api.errors import error_status
from dnet.api.responses import Reply, sse
from dnet.errors import DnetError
from dnet.head.text import GenerationEvent

CLOSE_TIMEOUT_S = 5.0


class StreamBody:
    """A streamed response's body; ``cleanup`` runs when it closes."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], cleanup: AsyncExitStack) -> None:
        self._chunks = chunks
        self._cleanup = cleanup
        self._closed = False

    def __aiter__(self) -> StreamBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self._chunks.aclose()
            finally:
                await self._cleanup.aclose()


def sse_response(body: AsyncIterator[bytes] | Any) -> Response:
    return Response(
        body,
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _from(
    first: GenerationEvent, events: AsyncIterator[GenerationEvent]
) -> AsyncGenerator[GenerationEvent, None]:
    yield first
    if first.finish_reason is None:
        async for e in events:
            yield e


async def generation_events(
    reply: Reply, first: GenerationEvent, events: AsyncIterator[GenerationEvent]
) -> AsyncGenerator[bytes, None]:
    """The stream of either endpoint: the opening chunk, a chunk for each event
    that has something to say, the usage chunk (when asked for), then ``[DONE]``;
    a failure mid-stream is an error event and the end."""
    n = 0
    opening = reply.opening()
    if opening is not None:
        yield sse(opening)
    try:
        async with aclosing(_from(first, events)) as rest:
            async for e in rest:
                n += 1
                body = reply.chunk(e)
                if body is not None:
                    yield sse(body)
    except DnetError as exc:
        yield sse(error_status(exc)[1])
        return
    closing = reply.closing(n)
    if closing is not None:
        yield sse(closing)
    yield sse("[DONE]")
