"""``Ring``: the peers of a loaded model in ring order, and generation sessions.

A session sends ``StartRequest`` and the prompt's token ids (chunked) to the first
peer; activations travel peer to peer; the last peer's first token comes back here.
From then on the request is a member of a decode lane (``dnet.head.lanes``): one
dispatcher task sends each lane's members as one batched ``Step`` and, as soon as
its tokens are back, the next one. Each session detokenizes and checks stops for
its own tokens alone, off that path.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Any

import attrs
import numpy as np
import trio

from dnet.errors import DnetError, LayerRangeError, ModelNotLoaded, PeerError, PeerUnavailable
from dnet.head.lanes import Lanes, StepPlan
from dnet.head.peers import PeerClient
from dnet.head.stops import StopMatcher
from dnet.identity import Identity, verify_signature
from dnet.protocol.messages import (
    Activation,
    EndRequest,
    Error,
    Loaded,
    LoadSlice,
    StartRequest,
    Status,
    Step,
    StepTokens,
    Token,
    Unload,
)
from dnet.sampling import SamplingParams
from dnet.schedule import prefill_schedule
from dnet.transport.connection import open_connection

log = logging.getLogger(__name__)

# CPU prefill runs as fast in 128- to 512-token chunks, and a running batch waits
# for at most one chunk per peer: smaller chunks stall it less.
DEFAULT_PREFILL_CHUNK = 256
TOKEN_TIMEOUT_S = 60.0


@attrs.frozen
class GenerationEvent:
    """One generated token, the text it completes (possibly empty while a
    multi-byte character or a possible stop string is pending), and, on the last
    event, why generation finished (``stop`` or ``length``)."""

    index: int
    token_id: int
    text: str
    logprob: float | None  # None unless the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None


@attrs.frozen
class PlanEntry:
    """One slice of a plan: which peer (by peer id) holds layers ``[start, end)``."""

    peer_id: str
    start: int
    end: int


@attrs.frozen
class _Failure:
    error: DnetError


@attrs.define(eq=False)
class _Session:
    channel: trio.MemorySendChannel[Token | Error | _Failure]
    prompt_tokens: int


def machines(addresses: Sequence[str]) -> int:
    """How many distinct hosts ``host:port`` addresses name."""
    return len({a.rsplit(":", 1)[0].strip("[]") for a in addresses})


def _ids_payload(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype="<i4").tobytes()


class DuplicatePeer(DnetError):
    """Two live peers prove the same peer id."""

    code = "duplicate_peer"


class Ring:
    """Connected peers; after ``load``, the ring of a model. Use ``open_ring``."""

    def __init__(
        self,
        nursery: trio.Nursery,
        identity: Identity,
        cluster_key: bytes,
        name: str,
        decode_lanes: int | None = None,
    ) -> None:
        self._nursery = nursery
        self._identity = identity
        self._cluster_key = cluster_key
        self._name = name
        self.peers: list[PeerClient] = []
        self.duplicates: list[tuple[str, str]] = []  # (peer id, address) refused as clones
        # Measured links, (from, to) → (when, link): reused by the next prepare.
        self.link_cache: dict[tuple[str, str], tuple[float, Any]] = {}
        self.order: list[PeerClient] = []
        self.model: str | None = None
        self.tokenizer: Any = None
        self.max_context: int | None = None
        self._sessions: dict[str, _Session] = {}
        self.closing = False
        self._membership = trio.Event()
        self.decode_lanes = decode_lanes  # None: one per machine of the ring
        self._step_ids = itertools.count()
        self.lanes = Lanes(1, self._step_ids)
        self._wakeup = trio.Event()
        # Seconds from a step's tokens arriving to the next step sent: what a
        # last-peer-to-first-peer shortcut would save, besides one hop.
        self.turnarounds: deque[float] = deque(maxlen=4096)
        self._tokens_at: float | None = None

    def _membership_changed(self) -> None:
        self._membership.set()
        self._membership = trio.Event()

    async def wait_peers(self, count: int) -> None:
        """Return once at least ``count`` peers are connected."""
        while len(self.peers) < count:
            await self._membership.wait()

    # -- membership -----------------------------------------------------------------

    async def connect(self, address: str, expected_peer_id: str | None = None) -> PeerClient:
        """Connect to one more peer; it stays in ``peers`` while connected.

        Raises:
            PeerUnavailable, HandshakeFailed, DuplicatePeer
        """
        client: PeerClient = await self._nursery.start(self._hold, address, expected_peer_id)
        return client

    async def _hold(
        self, address: str, expected: str | None, *, task_status: trio.TaskStatus[PeerClient]
    ) -> None:
        async with open_connection(
            address,
            self._identity,
            self._cluster_key,
            verify_signature,
            expected_peer_id=expected,
            name=self._name,
        ) as conn:
            client = PeerClient(conn, address)
            twin = next((p for p in self.peers if p.peer_id == client.peer_id and p.alive), None)
            if twin is not None:
                if twin.address == address:
                    task_status.started(twin)  # already connected to this one
                    return
                # Two live peers proving one id: a cloned state directory. Report it.
                self.duplicates.append((client.peer_id, address))
                raise DuplicatePeer(
                    f"{address} proves peer id {client.peer_id[:12]}, already live at "
                    f"{twin.address}: a copied state directory? Give each install its own."
                )
            self.peers.append(client)
            self._membership_changed()
            log.info("peer %s joined", client.label)
            task_status.started(client)
            try:
                await client.serve(self._on_request_message, self._on_closed)
            finally:
                self.peers.remove(client)
                self._membership_changed()

    # -- peer events (called from the PeerClient tasks) --------------------------

    def _on_request_message(self, message: Token | StepTokens | Error) -> None:
        if isinstance(message, StepTokens):
            self._tokens_at = time.perf_counter()
            rows = []
            for token in message.tokens:
                session = self._sessions.get(token.request_id)
                if session is not None:
                    session.channel.send_nowait(token)
                    rows.append((token.request_id, token.token_id, bool(token.finish_reason)))
            for rid in self.lanes.finished(message.step, rows):
                self._fail(rid, PeerError(f"the ring dropped request {rid} from a step"))
            self._wakeup.set()
            return
        rid = message.request_id or ""
        session = self._sessions.get(rid)
        if session is None:
            return
        session.channel.send_nowait(message)
        if isinstance(message, Error):
            self.lanes.leave(rid)
            self._wakeup.set()
        elif message.finish_reason is None and rid not in self.lanes:
            # The prompt's token: from now on the request steps with its lane.
            self.lanes.join(rid, session.prompt_tokens, message.token_id)
            self._wakeup.set()

    def _fail(self, rid: str, error: DnetError) -> None:
        session = self._sessions.get(rid)
        if session is not None:
            session.channel.send_nowait(_Failure(error))
        self.lanes.leave(rid)

    def _on_closed(self, peer: PeerClient, why: str) -> None:
        if self.closing:
            return
        log.warning("peer %s left: it %s", peer.label, why)
        if peer in self.order:
            for rid in list(self._sessions):
                self._fail(rid, PeerUnavailable(f"peer {peer.label} {why}"))

    async def _dispatch(self) -> None:
        """Send every lane's next step as soon as it is ready; runs for the ring's
        life."""
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
            if not self.order:
                raise ModelNotLoaded("the model was unloaded")
            await self.order[0].send(step, _ids_payload(plan.tokens))
        except DnetError as exc:
            for rid in plan.request_ids:
                self._fail(rid, exc)

    def peer(self, peer_id: str) -> PeerClient:
        for p in self.peers:
            if p.peer_id == peer_id:
                return p
        raise PeerUnavailable(f"no connected peer has id {peer_id}")

    # -- control -------------------------------------------------------------------

    async def status(self) -> list[Status]:
        return [await p.call_status() for p in self.peers]

    async def load(
        self,
        model: str,
        plan: Sequence[PlanEntry],
        *,
        max_context: int | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
        compute_dtype: str | None = None,
    ) -> list[Loaded]:
        """Load ``model`` across the peers named by ``plan`` (ring order; ranges must
        tile all layers). The model reference must be readable on every peer, and on
        the head (for the tokenizer).

        Raises:
            LayerRangeError, PeerUnavailable, PeerError, ModelNotFound
        """
        from dnet.runtime.model_dir import open_model_dir
        from dnet.runtime.tokenizer import load_tokenizer

        info = await trio.to_thread.run_sync(open_model_dir, model)
        expected = 0
        for entry in plan:
            if entry.start != expected or entry.end <= entry.start:
                raise LayerRangeError(f"plan {list(plan)} does not tile the layers at {expected}")
            expected = entry.end
        if expected != info.num_layers:
            raise LayerRangeError(f"plan covers {expected} of {info.num_layers} layers")
        order = [self.peer(e.peer_id) for e in plan]
        await self.unload()
        results: list[Loaded | None] = [None] * len(plan)
        errors: list[DnetError] = []

        async def load_one(i: int) -> None:
            entry = plan[i]
            prev = order[i - 1] if i > 0 else None
            nxt = order[i + 1] if i + 1 < len(order) else None
            msg = LoadSlice(
                model=str(info.path),
                start=entry.start,
                end=entry.end,
                is_first=prev is None,
                is_last=nxt is None,
                prev_address=prev.address if prev else None,
                prev_peer_id=prev.peer_id if prev else None,
                next_peer_id=nxt.peer_id if nxt else None,
                max_context=max_context,
                compute_dtype=compute_dtype,
            )
            try:
                reply = await order[i].call(msg)
                assert isinstance(reply, Loaded)
                results[i] = reply
            except DnetError as exc:
                errors.append(exc)

        if on_progress is not None:
            for p in order:
                p.on_progress = lambda client, msg: on_progress(client.peer_id, msg.done, msg.total)
        try:
            async with trio.open_nursery() as nursery:
                for i in range(len(plan)):
                    nursery.start_soon(load_one, i)
        finally:
            for p in order:
                p.on_progress = None
        if errors:
            await self.unload()
            raise errors[0]
        self.tokenizer = await trio.to_thread.run_sync(
            lambda: load_tokenizer(info.path, eos_token_ids=info.config.get("eos_token_id"))
        )
        self.order, self.model, self.max_context = order, str(info.path), max_context
        lanes = self.decode_lanes or machines([p.address for p in order])
        self.lanes = Lanes(lanes, self._step_ids)
        return [r for r in results if r is not None]

    async def unload(self) -> None:
        order, self.order, self.model = self.order or [], [], None
        for p in order:
            if p.alive:
                await p.call(Unload())

    # -- generation ------------------------------------------------------------------

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        from dnet.runtime.tokenizer import chat_prompt

        if self.tokenizer is None:
            raise ModelNotLoaded("no model is loaded")
        return chat_prompt(self.tokenizer, messages)

    async def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        *,
        max_tokens: int = 256,
        stop: Sequence[str] = (),
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        token_timeout: float = TOKEN_TIMEOUT_S,
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Generate from token ids; an async generator of ``GenerationEvent``s.

        Use it inside ``contextlib.aclosing`` so that stopping early frees the
        request on every peer at once.

        Raises:
            ModelNotLoaded, PeerUnavailable (a peer died or went silent for
            ``token_timeout``), PeerError (a peer reported an error)
        """
        if not self.order or self.tokenizer is None:
            raise ModelNotLoaded("no model is loaded")
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        params = params or SamplingParams()
        order, tokenizer = list(self.order), self.tokenizer
        first = order[0]
        rid = uuid.uuid4().hex
        send, receive = trio.open_memory_channel[Token | Error | _Failure](math.inf)
        self._sessions[rid] = _Session(send, len(prompt))
        try:
            dead = [p for p in order if not p.alive]
            if dead:
                raise PeerUnavailable(f"peer {dead[0].label} is not connected")
            await first.send(
                StartRequest(
                    rid,
                    params,
                    max_tokens,
                    self.max_context,
                    tuple(sorted(tokenizer.eos_token_ids)),
                    tuple(prompt),
                )
            )
            spans = prefill_schedule(len(prompt), prefill_chunk)
            for i, (a, b) in enumerate(spans):
                await first.send(
                    Activation(rid, a, "int32", (1, b - a), sample=i == len(spans) - 1),
                    _ids_payload(prompt[a:b]),
                )
            detok = copy.copy(tokenizer.detokenizer)
            detok.reset()
            stops = StopMatcher(stop)
            while True:
                with trio.move_on_after(token_timeout) as waited:
                    message = await receive.receive()
                if waited.cancelled_caught:
                    raise PeerUnavailable(
                        f"no token in {token_timeout:.0f}s from the ring "
                        f"({', '.join(p.label for p in order)})"
                    )
                if isinstance(message, _Failure):
                    raise message.error
                if isinstance(message, Error):
                    who = message.peer_id or "?"
                    label = next((p.label for p in order if p.peer_id == who), who[:12])
                    raise PeerError(
                        f"peer {label}: {message.message}", message.code, message.peer_id
                    )
                finish = message.finish_reason
                if finish == "stop":  # a stop token: not part of the text
                    detok.finalize()
                    text, _ = stops.feed(detok.last_segment)
                    text += stops.flush()
                else:
                    detok.add_token(message.token_id)
                    text, hit = stops.feed(detok.last_segment)
                    if hit:
                        finish = "stop"
                    elif finish == "length":
                        detok.finalize()
                        more, hit = stops.feed(detok.last_segment)
                        text += more + ("" if hit else stops.flush())
                yield GenerationEvent(
                    message.index,
                    message.token_id,
                    text,
                    message.logprob,
                    message.top_logprobs,
                    finish,
                )
                if finish is not None:
                    return
        finally:
            self._sessions.pop(rid, None)
            self.lanes.leave(rid)
            self._wakeup.set()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for p in order:
                    if p.alive:
                        with suppress(PeerUnavailable):
                            await p.send(EndRequest(rid))


@asynccontextmanager
async def open_ring(
    addresses: Sequence[str],
    identity: Identity,
    cluster_key: bytes,
    *,
    expected_peer_ids: Sequence[str | None] | None = None,
    name: str = "head",
    decode_lanes: int | None = None,
) -> AsyncIterator[Ring]:
    """Connect (and authenticate) to every address (more may join later through
    ``Ring.connect``); closes all on exit.

    Raises:
        PeerUnavailable, HandshakeFailed
    """
    expected = list(expected_peer_ids or [None] * len(addresses))
    async with trio.open_nursery() as nursery:
        ring = Ring(nursery, identity, cluster_key, name, decode_lanes)
        nursery.start_soon(ring._dispatch)
        try:
            for address, peer_id in zip(addresses, expected, strict=True):
                await ring.connect(address, peer_id)
            yield ring
        finally:
            ring.closing = True
            nursery.cancel_scope.cancel()
