"""A slice plus the per-request state around it: KV caches, positions, samplers.

Requests run alone (``run``: prefill chunks, single steps) or together (``step``:
one decode position for each of several requests, as one batch through the slice).
A request that takes part in batched steps keeps its caches as a row of a shared
``BatchKVCache`` (mlx_lm's, left-padded); rows join and leave as the head's batch
changes, and a request run alone again gets its own caches back.

``SliceEngine`` is synchronous and not thread-safe: call it only from the process's
compute thread (``dnet.runtime.compute``). Inputs and outputs are ``HostTensor``s or
plain ints, so nothing outside the runtime touches MLX.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from dnet.errors import (
    ComputeFailed,
    ContextOverflow,
    DnetError,
    DuplicateRequest,
    InvalidActivation,
    PositionMismatch,
    UnknownRequest,
)
from dnet.runtime.arrays import DTYPES, from_host, to_host
from dnet.runtime.batch_cache import Request, assemble, solo
from dnet.runtime.sampler import RequestSampler
from dnet.runtime.slice import LayerSlice
from dnet.sampling import SampledToken, SamplingParams
from dnet.tensor import HostTensor


@attrs.frozen
class StepResult:
    """What ``SliceEngine.step`` made of a batch: the rows that ran (in order), their
    outputs (activations for the next slice, or one token per row on the last
    slice), and the rows dropped, with why."""

    request_ids: tuple[str, ...]
    positions: tuple[int, ...]
    output: HostTensor | tuple[SampledToken, ...] | None
    dropped: tuple[tuple[str, DnetError], ...] = ()


class Chunk:
    """One input of one request (a prefill chunk, or a single position) on its way
    through the slice, made by ``SliceEngine.begin``. ``advance`` runs its layers,
    all at once or one at a time until asked to pause, so that a peer can run a
    decode step of other requests between two layers of a long chunk; ``output``
    is ``run``'s result once ``done``."""

    def __init__(self, engine: SliceEngine, req: Request, x: mx.array, sample: bool) -> None:
        assert req.cache is not None
        self._engine = engine
        self._req = req
        self._cache = req.cache
        self._sample = sample
        self._n = x.shape[1]
        self._fused = engine.slice.fused_takes(x)
        self._h, self._mask = engine.slice.begin(x, req.cache)
        self._next = 0  # the next layer to run, within the slice
        self.done = False
        self.output: HostTensor | SampledToken | None = None

    def advance(self, pause: Callable[[], bool] | None = None) -> bool:
        """Run the remaining layers, or with ``pause`` one layer at a time until
        ``pause()`` is true after one. Returns whether the input is through.

        Raises:
            ComputeFailed: the request is freed (its caches may hold half a chunk).
        """
        layer_slice, req = self._engine.slice, self._req
        total = layer_slice.num_layers
        try:
            out = None
            if self._next == 0 and self._fused:  # all layers in one C call
                out = layer_slice.run_fused(self._h, self._cache)
                self._next = total if out is not None else 0
            while self._next < total:
                first = self._next
                self._next = total if pause is None else first + 1
                self._h = layer_slice.run_layers(
                    self._h, self._mask, self._cache, first, self._next
                )
                if pause is not None and self._next < total:
                    mx.eval(self._h, [c.state for c in self._cache[first : self._next]])
                    if pause():
                        return False
            if out is None:
                out = layer_slice.finish(self._h)
            req.position += self._n
            self.done = True
            if not layer_slice.is_last:
                mx.eval(out, [c.state for c in self._cache])
                self.output = to_host(out)
            elif not self._sample:
                # Only the caches matter; the logits stay unevaluated and are dropped.
                mx.eval([c.state for c in self._cache])
            else:
                assert req.sampler is not None
                self.output = req.sampler.sample(out)
            return True
        except (RuntimeError, ValueError) as exc:
            self._engine.end(req.rid)  # its caches may hold half a chunk
            raise ComputeFailed(
                f"request {req.rid!r} failed in layers "
                f"{layer_slice.start}..{layer_slice.end}: {exc}"
            ) from exc


@attrs.frozen
class EngineStatistics:
    """A snapshot of an engine's state."""

    requests: int
    kv_bytes: int
    weight_bytes: int
    tokens_processed: int


class SliceEngine:
    """Runs one ``LayerSlice`` for many independent requests.

    Every request is started with ``start``, fed with ``run`` (each input continues
    at the request's current position) and freed with ``end``.
    """

    def __init__(
        self,
        layer_slice: LayerSlice,
        *,
        max_context: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slice = layer_slice
        self._clock = clock
        self.max_context = max_context or int(
            layer_slice.model.config.get("max_position_embeddings", 32768)
        )
        self._requests: dict[str, Request] = {}
        self._tokens_processed = 0
        self.batching = layer_slice.batching

    # -- request lifecycle -------------------------------------------------------

    def start(
        self,
        request_id: str,
        params: SamplingParams | None = None,
        prompt_tokens: Sequence[int] = (),
        max_context: int | None = None,
    ) -> None:
        """Create the caches (and on the last slice the sampler) of a request.

        ``prompt_tokens`` feed the repetition penalty on the last slice.

        Raises:
            DuplicateRequest: ``request_id`` is already running here.
        """
        if request_id in self._requests:
            raise DuplicateRequest(f"request {request_id!r} is already running on this slice")
        limit = min(max_context or self.max_context, self.max_context)
        sampler = (
            RequestSampler(params or SamplingParams(), list(prompt_tokens))
            if self.slice.is_last
            else None
        )
        self._requests[request_id] = Request(
            request_id, self.slice.make_cache(), limit, sampler, self._clock()
        )

    def end(self, request_id: str) -> None:
        """Free a request's caches. Ending an unknown request is a no-op (end and
        cancel may race). A batched request's row is dropped at the next step of
        its batch (one copy for all the rows that left)."""
        self._requests.pop(request_id, None)

    def trim(self, request_id: str, n: int) -> int:
        """Drop the last ``n`` positions of a request's caches; returns how many
        were dropped.

        Raises:
            UnknownRequest
        """
        req = solo(self._get(request_id))
        assert req.cache is not None
        dropped = min(n, req.position)
        for c in req.cache:
            c.trim(dropped)
        req.position -= dropped
        if req.sampler is not None:
            req.sampler.forget(dropped)
        return dropped

    def position(self, request_id: str) -> int:
        """How many positions a request's caches hold.

        Raises:
            UnknownRequest
        """
        return self._get(request_id).position

    def expire_idle(self, max_idle_s: float, now: float | None = None) -> list[str]:
        """Free requests unused for ``max_idle_s`` seconds; returns their ids."""
        now = self._clock() if now is None else now
        stale = [rid for rid, r in self._requests.items() if now - r.last_used > max_idle_s]
        for rid in stale:
            self.end(rid)
        return stale

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def kv_bytes(self, request_id: str | None = None) -> int:
        if request_id is not None:
            return self._get(request_id).kv_bytes
        # list() copies in one step under the GIL: safe against the compute thread.
        requests = list(self._requests.values())
        batches = {id(r.batch): r.batch for r in requests if r.batch is not None}
        solo = sum(r.kv_bytes for r in requests if r.batch is None)
        return solo + sum(b.kv_bytes for b in batches.values())

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            len(self._requests), self.kv_bytes(), self.slice.weight_bytes, self._tokens_processed
        )

    # -- running ---------------------------------------------------------------

    def _get(self, request_id: str) -> Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise UnknownRequest(f"request {request_id!r} is not running on this slice") from None

    def _token_ids(self, ids: np.ndarray) -> np.ndarray:
        # Checked on the host: no MLX round trip per step.
        vocab = self.slice.vocab_size
        if ids.size == 0:
            raise InvalidActivation("no token ids given")
        if ids.min() < 0 or ids.max() >= vocab:
            raise InvalidActivation(
                f"token id out of range [0, {vocab}): saw {ids.min()}..{ids.max()}"
            )
        return ids.astype(np.int32, copy=False)

    def _as_input(self, inputs: HostTensor | Sequence[int]) -> mx.array:
        if isinstance(inputs, HostTensor):
            if self.slice.is_first:
                if inputs.dtype != "int32":
                    raise InvalidActivation(
                        f"the first slice takes int32 token ids, got {inputs.dtype}"
                    )
                self._token_ids(np.frombuffer(inputs.data, dtype="<i4"))
            x = from_host(inputs)
        else:
            if not self.slice.is_first:
                raise InvalidActivation(
                    f"layers {self.slice.start}..{self.slice.end} take activations, not token ids"
                )
            x = mx.array(self._token_ids(np.asarray(inputs, dtype=np.int64).reshape(1, -1)))
        if x.ndim == 1 and self.slice.is_first:
            x = x[None]
        self.slice.check_input(x)
        if x.shape[0] != 1:
            raise InvalidActivation(f"one request per call: batch must be 1, got {x.shape[0]}")
        return x

    def run(
        self,
        request_id: str,
        inputs: HostTensor | Sequence[int],
        *,
        position: int | None = None,
        sample: bool = True,
    ) -> HostTensor | SampledToken | None:
        """Run the next positions of a request through the slice.

        ``inputs`` are token ids (first slice) or the previous slice's activations.
        ``position``, when given, must equal the request's current position, which
        catches lost or reordered chunks. Returns the activations for the next
        slice; on the last slice a sampled token, or ``None`` when ``sample`` is
        false (a prefill chunk whose logits nobody needs).

        Raises:
            UnknownRequest, InvalidActivation, PositionMismatch, ContextOverflow,
            ComputeFailed
        """
        chunk = self.begin(request_id, inputs, position=position, sample=sample)
        chunk.advance()
        return chunk.output

    def begin(
        self,
        request_id: str,
        inputs: HostTensor | Sequence[int],
        *,
        position: int | None = None,
        sample: bool = True,
    ) -> Chunk:
        """``run``, to be driven layer by layer: see ``Chunk``. Until the chunk is
        through, the request takes no other work.

        Raises:
            UnknownRequest, InvalidActivation, PositionMismatch, ContextOverflow
        """
        req = solo(self._get(request_id))
        assert req.cache is not None
        x = self._as_input(inputs)
        n = x.shape[1]
        if position is not None and position != req.position:
            raise PositionMismatch(
                f"request {request_id!r} is at position {req.position}, input claims {position}"
            )
        if req.position + n > req.max_context:
            raise ContextOverflow(
                f"request {request_id!r} would reach {req.position + n} positions; "
                f"the limit is {req.max_context}"
            )
        req.last_used = self._clock()
        self._tokens_processed += n
        return Chunk(self, req, x, sample)

    def logits(self, request_id: str, inputs: HostTensor | Sequence[int]) -> HostTensor:
        """Like ``run`` on the last slice, but return the last position's logits
        (float32) instead of sampling.

        Raises:
            UnknownRequest, InvalidActivation, ContextOverflow
        """
        if not self.slice.is_last:
            raise InvalidActivation("logits come only from the last slice")
        req = solo(self._get(request_id))
        assert req.cache is not None
        x = self._as_input(inputs)
        if req.position + x.shape[1] > req.max_context:
            raise ContextOverflow(f"request {request_id!r} would pass {req.max_context} positions")
        out = self.slice(x, req.cache)
        req.position += x.shape[1]
        return to_host(out.astype(DTYPES["float32"]))

    # -- batched decode steps ------------------------------------------------------

    def step(
        self, request_ids: Sequence[str], positions: Sequence[int], inputs: HostTensor
    ) -> StepResult:
        """Run one position of each request in ``request_ids`` as one batch: row
        ``i`` of ``inputs`` (token ids ``[rows, 1]`` on the first slice, else hidden
        states ``[rows, 1, hidden]``) continues ``request_ids[i]`` at
        ``positions[i]``. Rows that cannot run (unknown request, wrong position, no
        room left) are dropped, not fatal to the others.

        Raises:
            InvalidActivation: ``inputs`` do not fit the slice or the row count.
            ComputeFailed: the batch failed; its requests are freed.
        """
        rows = len(request_ids)
        if len(positions) != rows or len(set(request_ids)) != rows:
            raise InvalidActivation("a step needs one position per distinct request id")
        x = self._as_batch_input(inputs, rows)
        keep, dropped = self._runnable(request_ids, positions)
        rids = [request_ids[i] for i in keep]
        kept_positions = tuple(positions[i] for i in keep)
        if not rids:
            return StepResult((), (), None, tuple(dropped))
        if len(keep) < rows:
            x = x[mx.array(keep)]
        reqs = [self._requests[r] for r in rids]
        now = self._clock()
        for req in reqs:
            req.last_used = now
        self._tokens_processed += len(rids)
        try:
            if len(reqs) == 1 or not self.batching:
                caches: list[Any] = [solo(r).cache for r in reqs]
                outs = [self.slice(x[i : i + 1], c) for i, c in enumerate(caches)]
                out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
                state = [c.state for cache in caches for c in cache]
            else:
                cache = assemble(reqs, self._requests, self.slice.num_layers).cache
                out = self.slice(x, cache)
                state = [(c.keys, c.values, c.offset) for c in cache]
            for req in reqs:
                req.position += 1
            mx.eval(out, state)
            if not self.slice.is_last:
                return StepResult(tuple(rids), kept_positions, to_host(out), tuple(dropped))
            tokens = []
            for i, req in enumerate(reqs):
                assert req.sampler is not None
                tokens.append(req.sampler.sample(out[i : i + 1]))
            return StepResult(tuple(rids), kept_positions, tuple(tokens), tuple(dropped))
        except (RuntimeError, ValueError) as exc:
            for rid in rids:
                self.end(rid)
            raise ComputeFailed(
                f"a step of {len(rids)} request(s) failed in layers "
                f"{self.slice.start}..{self.slice.end}: {exc}"
            ) from exc

    def _runnable(
        self, request_ids: Sequence[str], positions: Sequence[int]
    ) -> tuple[list[int], list[tuple[str, DnetError]]]:
        """The rows of a step that can run, and why each of the others cannot."""
        keep: list[int] = []
        dropped: list[tuple[str, DnetError]] = []
        for i, (rid, pos) in enumerate(zip(request_ids, positions, strict=True)):
            req = self._requests.get(rid)
            if req is None:
                dropped.append((rid, UnknownRequest(f"request {rid!r} is not running here")))
            elif pos != req.position:
                dropped.append(
                    (rid, PositionMismatch(f"request {rid!r} is at {req.position}, not {pos}"))
                )
            elif req.position + 1 > req.max_context:
                dropped.append(
                    (rid, ContextOverflow(f"request {rid!r} reached its {req.max_context} limit"))
                )
            else:
                keep.append(i)
        return keep, dropped

    def _as_batch_input(self, inputs: HostTensor, rows: int) -> mx.array:
        if self.slice.is_first:
            if inputs.dtype != "int32" or len(inputs.shape) != 2:
                raise InvalidActivation(
                    f"the first slice takes int32 token ids [rows, 1], got "
                    f"{inputs.dtype} {inputs.shape}"
                )
            self._token_ids(np.frombuffer(inputs.data, dtype="<i4"))
        x = from_host(inputs)
        if x.shape[0] != rows or (x.ndim > 1 and x.shape[1] != 1):
            raise InvalidActivation(
                f"a step of {rows} request(s) takes [{rows}, 1, ...] inputs, got {tuple(x.shape)}"
            )
        self.slice.check_input(x)
        return x
