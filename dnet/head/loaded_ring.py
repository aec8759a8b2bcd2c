"""``LoadedRing``: a model loaded across peers in ring order, its tokenizer, its
decode lanes and the sessions running on it. "No model loaded" is the absence of
one; ``Cluster.open_ring`` (or ``Cluster.load``) makes it.

Once a session's first token is back, its request joins a decode lane
(``dnet.head.lanes``); one dispatcher task sends each lane's steps as they are due.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import aclosing

import trio

from dnet.errors import DnetError, PeerError, PeerUnavailable
from dnet.head.lanes import Lanes, StepPlan
from dnet.head.loading import unload_slices
from dnet.head.peers import PeerClient
from dnet.head.session import PREFILL_CHUNK, TOKEN_TIMEOUT_S, Failure, Session, ids_payload
from dnet.head.text import GenerationEvent, SessionText
from dnet.models.model_dir import ModelDir
from dnet.models.tokenizer import Tokenizer
from dnet.protocol.messages import (
    Error,
    Loaded,
    Status,
    Step,
    StepTokens,
    Token,
)
from dnet.sampling import SamplingParams

log = logging.getLogger(__name__)


def machines(addresses: Sequence[str]) -> int:
    """How many distinct hosts ``host:port`` addresses name."""
    return len({a.rsplit(":", 1)[0].strip("[]") for a in addresses})


class LoadedRing:
    """Peers in ring order holding ``model``; run ``serve_dispatch`` for its life."""

    def __init__(
        self,
        order: Sequence[PeerClient],
        model: ModelDir,
        tokenizer: Tokenizer,
        loaded: Sequence[Loaded],
        *,
        max_context: int | None,
        lanes: int,
        steps: Iterator[int] | None = None,
    ) -> None:
        self.order = list(order)
        self.model = model
        self.tokenizer = tokenizer
        self.loaded = list(loaded)
        self.max_context = max_context
        self.lanes = Lanes(lanes, steps if steps is not None else itertools.count())
        self._sessions: dict[str, Session] = {}
        self._wakeup = trio.Event()
        # Seconds from a step's tokens arriving to the next step sent: what a
        # last-peer-to-first-peer shortcut would save, besides one hop.
        self.turnarounds: deque[float] = deque(maxlen=4096)
        self._tokens_at: float | None = None
        self.unloaded = trio.Event()  # set once its peers are told to unload

    async def status(self) -> list[Status]:
        """Each peer's status, in ring order.

        Raises:
            PeerUnavailable, PeerError
        """
        return [await p.call_status() for p in self.order]

    @property
    def healthy(self) -> bool:
        return all(p.alive for p in self.order)

    # -- from the cluster's reader tasks -------------------------------------------

    def on_message(self, message: Token | StepTokens | Error) -> None:
        if isinstance(message, StepTokens):
            self._tokens_at = time.perf_counter()
            rows = []
            for token in message.tokens:
                session = self._sessions.get(token.request_id)
                if session is not None:
                    session.deliver(token)
                    rows.append((token.request_id, token.token_id, bool(token.finish_reason)))
            for rid in self.lanes.finished(message.step, rows):
                self._fail(rid, PeerError(f"the ring dropped request {rid} from a step"))
            self._wakeup.set()
            return
        rid = message.request_id or ""
        session = self._sessions.get(rid)
        if session is None:
            return
        session.deliver(message)
        if isinstance(message, Error):
            self.lanes.leave(rid)
            self._wakeup.set()
        elif message.finish_reason is None and rid not in self.lanes:
            # The prompt's token: from now on the request steps with its lane.
            self.lanes.join(rid, len(session.prompt), message.token_id)
            self._wakeup.set()

    def peer_lost(self, peer: PeerClient, why: str) -> None:
        if peer in self.order:
            for rid in list(self._sessions):
                self._fail(rid, PeerUnavailable(f"peer {peer.label} {why}"))

    def _fail(self, rid: str, error: DnetError) -> None:
        session = self._sessions.get(rid)
        if session is not None:
            session.deliver(Failure(error))
        self.lanes.leave(rid)

    # -- the dispatcher ------------------------------------------------------------

    async def serve_dispatch(self) -> None:
        """Send every lane's next step as soon as it is ready; runs until cancelled."""
        while True:
            self._wakeup = trio.Event()
            plans = self.lanes.ready()
            for plan in plans:
                await self._send_step(plan)
            if plans and self._tokens_at is not None:
                self.turnarounds.append(time.perf_counter() - self._tokens_at)
                self._tokens_at = None
            await self._wakeup.wait()

    async def _send_step(self, plan: StepPlan) -> None:
        rows = len(plan.request_ids)
        step = Step(plan.step, plan.request_ids, plan.positions, "int32", (rows, 1))
        try:
            await self.order[0].send(step, ids_payload(plan.tokens))
        except DnetError as exc:
            for rid in plan.request_ids:
                self._fail(rid, exc)

    # -- generation ----------------------------------------------------------------

    async def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        logprobs: bool = False,
        prefill_chunk: int = PREFILL_CHUNK,
        token_timeout: float = TOKEN_TIMEOUT_S,
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Generate from token ids; an async generator of ``GenerationEvent``s.

        Use it inside ``contextlib.aclosing`` so that stopping early frees the
        request on every peer at once.

        Raises:
            PeerUnavailable (a peer died or went silent for ``token_timeout``),
            PeerError (a peer reported an error)
        """
        session = Session(
            self.order,
            prompt,
            params or SamplingParams(),
            SessionText(self.tokenizer, stop, logprobs=logprobs),
            max_tokens=max_tokens,
            max_context=self.max_context,
            eos_token_ids=sorted(self.tokenizer.eos_token_ids),
        )
        self._sessions[session.rid] = session
        try:
            await session.start(prefill_chunk)
            async with aclosing(session.events(token_timeout)) as events:
                async for event in events:
                    yield event
        finally:
            self._sessions.pop(session.rid, None)
            self.lanes.leave(session.rid)
            self._wakeup.set()
            await session.end()

    async def unload(self) -> None:
        """Tell the peers to drop their slices (a ring held by ``Cluster.load``
        then ends)."""
        if not self.unloaded.is_set():
            self.unloaded.set()
            await unload_slices(self.order)
