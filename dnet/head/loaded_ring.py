"""``LoadedRing``: a model loaded across peers in ring order, its tokenizer, its
decode lanes and the sessions running on it. "No model loaded" is the absence of
one; ``Cluster.open_ring`` (or ``Cluster.load``) makes it.

Once a session's first token is back, the request is a member of a decode lane
(``dnet.head.lanes``): one dispatcher task sends each lane's members as one batched
``Step`` and, as soon as its tokens are back, the next one.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import aclosing

import attrs
import trio

from dnet.errors import DnetError, LayerRangeError, PeerError, PeerUnavailable
from dnet.head.lanes import Lanes, StepPlan
from dnet.head.peers import PeerClient
from dnet.head.session import PREFILL_CHUNK, TOKEN_TIMEOUT_S, Failure, Session, ids_payload
from dnet.head.text import GenerationEvent, SessionText
from dnet.models.manifest import Manifest, slice_files
from dnet.models.model_dir import ModelDir
from dnet.models.tokenizer import Tokenizer
from dnet.protocol.messages import (
    Error,
    Loaded,
    LoadSlice,
    Status,
    Step,
    StepTokens,
    Token,
    Unload,
    Unloaded,
)
from dnet.sampling import SamplingParams

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (peer id, bytes done, bytes total)


@attrs.frozen
class PlanEntry:
    """One slice of a plan: which peer (by peer id) holds layers ``[start, end)``."""

    peer_id: str
    start: int
    end: int


def machines(addresses: Sequence[str]) -> int:
    """How many distinct hosts ``host:port`` addresses name."""
    return len({a.rsplit(":", 1)[0].strip("[]") for a in addresses})


def check_plan(plan: Sequence[PlanEntry], num_layers: int) -> None:
    """Raises:
    LayerRangeError: the ranges do not tile ``[0, num_layers)`` in order.
    """
    expected = 0
    for entry in plan:
        if entry.start != expected or entry.end <= entry.start:
            raise LayerRangeError(f"plan {list(plan)} does not tile the layers at {expected}")
        expected = entry.end
    if expected != num_layers:
        raise LayerRangeError(f"plan covers {expected} of {num_layers} layers")


async def load_slices(
    model: ModelDir,
    manifest: Manifest,
    plan: Sequence[PlanEntry],
    order: Sequence[PeerClient],
    *,
    max_context: int | None,
    compute_dtype: str | None,
    on_progress: Progress | None = None,
) -> list[Loaded]:
    """Send every peer its ``LoadSlice`` at once (naming, by ``manifest``, the spans
    of the model files its slice reads; peers fetch what they lack from this head);
    the replies in ring order.

    Raises:
        PeerUnavailable, PeerError: the first failure (the others' slices stay
            loaded: the caller unloads).
    """
    results: list[Loaded | None] = [None] * len(plan)
    errors: list[DnetError] = []

    async def load_one(i: int) -> None:
        prev = order[i - 1] if i > 0 else None
        nxt = order[i + 1] if i + 1 < len(order) else None
        message = LoadSlice(
            model=str(model.path),
            start=plan[i].start,
            end=plan[i].end,
            is_first=prev is None,
            is_last=nxt is None,
            prev_address=prev.address if prev else None,
            prev_peer_id=prev.peer_id if prev else None,
            next_peer_id=nxt.peer_id if nxt else None,
            max_context=max_context,
            compute_dtype=compute_dtype,
            model_id=manifest.model_id,
            files=slice_files(manifest, model, plan[i].start, plan[i].end),
        )
        try:
            results[i] = await order[i].call(message, Loaded)
        except DnetError as exc:
            errors.append(exc)

    for p in order:
        p.on_progress = (
            None
            if on_progress is None
            else lambda client, msg: on_progress(client.peer_id, msg.done, msg.total)
        )
    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(plan)):
                nursery.start_soon(load_one, i)
    finally:
        for p in order:
            p.on_progress = None
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]


async def unload_slices(order: Sequence[PeerClient]) -> None:
    for p in order:
        if p.alive:
            await p.call(Unload(), Unloaded)


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
