"""What a peer does with requests: start them, run prefill chunks and batched
decode steps on its slice, and pass outputs on (to the next peer) or back (the last
peer's tokens, to the head). Mixed into ``PeerDaemon``, which owns the state."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable

import attrs

from dnet.errors import DnetError, ModelNotLoaded, UnknownRequest
from dnet.peer.outbox import Outbox
from dnet.peer.work import WorkQueue
from dnet.protocol.messages import (
    Activation,
    Cancel,
    EndRequest,
    Error,
    LoadSlice,
    Message,
    StartRequest,
    Step,
    StepTokens,
    Token,
)
from dnet.runtime.compute import ComputeThread
from dnet.runtime.engine import Chunk, SliceEngine, StepResult
from dnet.sampling import SampledToken
from dnet.tensor import HostTensor

log = logging.getLogger(__name__)

RATE_WINDOW_S = 10.0

# How long a prefill chunk runs its layers before it lets waiting decode steps in.
# Each decode step costs a pass over the weights whatever its rows; yielding after
# every layer made a ring of 2 CPU peers run many 1-row steps while later prompts
# prefilled (a 64-token prompt's chunk is ~50 ms a layer on the 0.6B shape, a
# 256-token one ~175 ms).
PREFILL_SLICE_S = 0.25


class _Pause:
    """A chunk's ``pause``: decode steps wait, and the chunk has run its layers for
    at least ``slice_s`` since ``restart``. Called on the compute thread."""

    def __init__(self, waiting: Callable[[], bool], slice_s: float) -> None:
        self._waiting = waiting
        self._slice_s = slice_s
        self._since = time.perf_counter()

    def restart(self) -> None:
        self._since = time.perf_counter()

    def __call__(self) -> bool:
        return self._waiting() and time.perf_counter() - self._since >= self._slice_s


@attrs.define
class RequestMeta:
    """What the last slice needs to know to finish a request."""

    max_tokens: int
    stop_token_ids: frozenset[int]
    generated: int = 0


class RequestWork:
    """The request half of a peer daemon."""

    peer_id: str
    engine: SliceEngine | None
    loaded: LoadSlice | None
    prefill_slice_s: float
    step_sizes: Counter[int]
    _compute: ComputeThread
    _queue: WorkQueue
    _meta: dict[str, RequestMeta]
    _held: list[tuple[Activation, bytes]]
    _outbox: Outbox
    _recent: deque[tuple[float, int]]
    _step_s: float
    _step_rows: float

    async def _worker(self) -> None:
        while True:
            message, payload = await self._queue.get()
            if isinstance(message, Step):
                await self._step(message, payload)
                continue
            rid = str(getattr(message, "request_id", ""))
            try:
                await self._work(message, payload)
            except DnetError as exc:
                self._fail(rid, exc)

    def _fail(self, rid: str, exc: DnetError) -> None:
        self._meta.pop(rid, None)
        self._to_controller(Error(exc.code, exc.message, rid, self.peer_id))

    async def _step(self, message: Step, payload: bytes) -> None:
        """Run a decode step's rows as one batch and pass the survivors on. The step
        always travels to the end, empty if need be, so the head learns it is over."""
        engine = self.engine
        result = StepResult((), (), None)
        if engine is None:
            for rid in message.request_ids:
                self._fail(rid, ModelNotLoaded("no model is loaded on this peer"))
        elif message.request_ids:
            tensor = HostTensor(message.dtype, message.shape, payload)
            started = time.perf_counter()
            try:
                result = await self._compute.run(
                    engine.step, message.request_ids, message.positions, tensor
                )
            except DnetError as exc:
                for rid in message.request_ids:
                    self._fail(rid, exc)
            self._measure_step(time.perf_counter() - started, len(result.request_ids))
            for rid, why in result.dropped:
                if not isinstance(why, UnknownRequest):  # unknown: ended while on its way
                    self._fail(rid, why)
        out = result.output
        if isinstance(out, tuple):
            tokens = tuple(
                self._token(rid, t) for rid, t in zip(result.request_ids, out, strict=True)
            )
            self._to_controller(StepTokens(message.step, tokens))
        elif engine is not None and engine.slice.is_last:
            self._to_controller(StepTokens(message.step, ()))
        elif out is None:
            empty = Step(message.step, (), (), "int32", (0, 1))
            self._to_next(empty)
        else:
            forward = Step(message.step, result.request_ids, result.positions, out.dtype, out.shape)
            self._to_next(forward, out.data)
        held, self._held = self._held, []
        for chunk, data in held:
            self._to_next(chunk, data)

    async def _work(self, message: Message, payload: bytes) -> None:
        engine = self.engine
        if isinstance(message, EndRequest | Cancel):
            self._meta.pop(message.request_id, None)
            if engine is not None:
                await self._compute.run(engine.end, message.request_id)
            return
        if engine is None:
            raise ModelNotLoaded("no model is loaded on this peer")
        if isinstance(message, StartRequest):
            await self._start(engine, message)
            return
        assert isinstance(message, Activation)
        await self._activation(engine, message, payload)

    async def _start(self, engine: SliceEngine, message: StartRequest) -> None:
        await self._compute.run(
            engine.start,
            message.request_id,
            message.sampling,
            message.prompt_tokens,
            message.max_context,
        )
        if engine.slice.is_last:
            self._meta[message.request_id] = RequestMeta(
                message.max_tokens, frozenset(message.stop_token_ids)
            )
        else:
            self._to_next(message)

    async def _activation(self, engine: SliceEngine, message: Activation, payload: bytes) -> None:
        tensor = HostTensor(message.dtype, message.shape, payload)
        tokens = message.shape[1] if len(message.shape) > 1 else message.shape[0]
        started = time.perf_counter()
        # A prefill chunk pauses between two layers when decode steps wait and it has
        # run for PREFILL_SLICE_S since it (re)started, and they run there: a long
        # prompt holds a running batch back by about that long.
        pause = _Pause(self._queue.has_steps, self.prefill_slice_s) if tokens > 1 else None

        def begin() -> tuple[Chunk, bool]:  # one trip to the compute thread, not two
            chunk = engine.begin(
                message.request_id, tensor, position=message.position, sample=message.sample
            )
            return chunk, chunk.advance(pause)

        chunk, done = await self._compute.run(begin)
        while not done:
            while (work := self._queue.take_step()) is not None:
                step, step_payload = work
                assert isinstance(step, Step)
                await self._step(step, step_payload)
            assert pause is not None
            pause.restart()
            done = await self._compute.run(chunk.advance, pause)
        out = chunk.output
        if tokens == 1:  # a decode step: what the solver's stage time predicts
            self._measure_step(time.perf_counter() - started, 1)
        else:
            self._count(tokens)
        if isinstance(out, HostTensor):
            forward = Activation(
                message.request_id, message.position, out.dtype, out.shape, message.sample
            )
            if self._queue.has_steps():
                # A decode step runs here next: let it reach the next peer first, so
                # it waits there for no chunk (the step never depends on this one).
                self._held.append((forward, out.data))
            else:
                self._to_next(forward, out.data)
        elif isinstance(out, SampledToken):
            self._to_controller(self._token(message.request_id, out))

    def _measure_step(self, took: float, rows: int) -> None:
        if rows == 0:
            return
        self.step_sizes[rows] += 1
        first = self._step_s == 0
        self._step_s = took if first else 0.8 * self._step_s + 0.2 * took
        self._step_rows = rows if first else 0.8 * self._step_rows + 0.2 * rows
        self._count(rows)

    def _token(self, rid: str, token: SampledToken) -> Token:
        meta = self._meta.get(rid)
        index, reason = 0, None
        if meta is not None:
            index = meta.generated
            meta.generated += 1
            if token.token_id in meta.stop_token_ids:
                reason = "stop"
            elif meta.generated >= meta.max_tokens:
                reason = "length"
        return Token(rid, token.token_id, token.logprob, token.top_logprobs, reason, index)

    def _to_next(self, message: Message, payload: bytes = b"") -> None:
        self._outbox.to_next(message, payload)

    def _to_controller(self, message: Message) -> None:
        self._outbox.to_controller(message)

    def _count(self, n: int) -> None:
        now = time.monotonic()
        self._recent.append((now, n))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()
