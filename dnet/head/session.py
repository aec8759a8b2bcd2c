"""``Session``: one generation on a loaded ring, its network side.

It sends ``StartRequest`` and the prompt's token ids (chunked) to the first peer;
the last peer's first token comes back through the ring, which from then on steps
the request with its decode lane. The session waits for its tokens, turns them into
events with its ``SessionText``, and on close ends the request on every peer.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING

import attrs
import numpy as np
import trio

from dnet.errors import DnetError, PeerError, PeerUnavailable
from dnet.head.text import GenerationEvent, SessionText
from dnet.protocol.messages import Activation, EndRequest, Error, StartRequest, Token
from dnet.sampling import SamplingParams
from dnet.schedule import prefill_schedule

if TYPE_CHECKING:
    from dnet.head.peers import PeerClient

# CPU prefill runs as fast in 128- to 512-token chunks, and a running batch waits
# for at most one chunk per peer: smaller chunks stall it less.
PREFILL_CHUNK = 256
# Liveness is the health checks' job (a peer that stops answering pings is
# dropped within seconds, and its requests fail); this only bounds a ring that
# answers pings yet makes no token, so a long but healthy prefill is never cut.
TOKEN_TIMEOUT_S = 600.0
END_TIMEOUT_S = 2.0


@attrs.frozen
class Failure:
    """The ring failed this request (a peer left, a step dropped it)."""

    error: DnetError


def ids_payload(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


class Session:
    def __init__(
        self,
        order: Sequence[PeerClient],
        prompt: Sequence[int],
        params: SamplingParams,
        text: SessionText,
        *,
        max_tokens: int,
        max_context: int | None,
        eos_token_ids: Sequence[int],
    ) -> None:
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        self.rid = uuid.uuid4().hex
        self.prompt = tuple(prompt)
        self._order = list(order)
        self._params = params
        self._text = text
        self._max_tokens = max_tokens
        self._max_context = max_context
        self._eos = tuple(sorted(eos_token_ids))
        self._send, self._receive = trio.open_memory_channel[Token | Error | Failure](math.inf)

    def deliver(self, message: Token | Error | Failure) -> None:
        """A message for this request, from the ring's reader tasks."""
        self._send.send_nowait(message)

    async def start(self, prefill_chunk: int = PREFILL_CHUNK) -> None:
        """Send the request and its prompt to the first peer.

        Raises:
            PeerUnavailable
        """
        dead = [p for p in self._order if not p.alive]
        if dead:
            raise PeerUnavailable(f"peer {dead[0].label} is not connected")
        first = self._order[0]
        await first.send(
            StartRequest(
                self.rid, self._params, self._max_tokens, self._max_context, self._eos, self.prompt
            )
        )
        spans = prefill_schedule(len(self.prompt), prefill_chunk)
        for i, (a, b) in enumerate(spans):
            await first.send(
                Activation(self.rid, a, "int32", (1, b - a), sample=i == len(spans) - 1),
                ids_payload(self.prompt[a:b]),
            )

    async def events(
        self, token_timeout: float = TOKEN_TIMEOUT_S
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Events until the one that finishes.

        Raises:
            PeerUnavailable (a peer died or the ring was silent for ``token_timeout``),
            PeerError (a peer reported an error)
        """
        while True:
            with trio.move_on_after(token_timeout) as waited:
                message = await self._receive.receive()
            if waited.cancelled_caught:
                raise PeerUnavailable(
                    f"no token in {token_timeout:.0f}s from the ring "
                    f"({', '.join(p.label for p in self._order)})"
                )
            if isinstance(message, Failure):
                raise message.error
            if isinstance(message, Error):
                raise self._peer_error(message)
            event = self._text.feed(message)
            yield event
            if event.finish_reason is not None:
                return

    def _peer_error(self, message: Error) -> PeerError:
        who = message.peer_id or "?"
        label = next((p.label for p in self._order if p.peer_id == who), who[:12])
        return PeerError(f"peer {label}: {message.message}", message.code, message.peer_id)

    async def end(self) -> None:
        """Free the request on every peer (shielded: also when cancelled)."""
        with trio.CancelScope(shield=True), trio.move_on_after(END_TIMEOUT_S):
            for p in self._order:
                if p.alive:
                    with suppress(PeerUnavailable):
                        await p.send(EndRequest(self.rid))
