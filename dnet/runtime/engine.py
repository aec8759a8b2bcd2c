"""A slice plus the per-request state around it: KV caches, positions, samplers.

``SliceEngine`` is synchronous and not thread-safe: call it only from the process's
compute thread (``dnet.runtime.compute``). Inputs and outputs are ``HostTensor``s or
plain ints, so nothing outside the runtime touches MLX.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import attrs
import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from dnet.errors import (
    ComputeFailed,
    ContextOverflow,
    DuplicateRequest,
    InvalidActivation,
    PositionMismatch,
    UnknownRequest,
)
from dnet.runtime.arrays import DTYPES, from_host, to_host
from dnet.runtime.sampler import RequestSampler
from dnet.runtime.slice import LayerSlice
from dnet.sampling import SampledToken, SamplingParams
from dnet.tensor import HostTensor


@attrs.define
class _Request:
    cache: list[KVCache]
    max_context: int
    sampler: RequestSampler | None
    last_used: float

    @property
    def position(self) -> int:
        return self.cache[0].offset

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


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
        self._requests: dict[str, _Request] = {}
        self._tokens_processed = 0

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
        self._requests[request_id] = _Request(
            self.slice.make_cache(), limit, sampler, self._clock()
        )

    def end(self, request_id: str) -> None:
        """Free a request's caches. Ending an unknown request is a no-op (end and
        cancel may race)."""
        self._requests.pop(request_id, None)

    def trim(self, request_id: str, n: int) -> int:
        """Drop the last ``n`` positions of a request's caches; returns how many
        were dropped.

        Raises:
            UnknownRequest
        """
        req = self._get(request_id)
        dropped = min(n, req.position)
        for c in req.cache:
            c.trim(dropped)
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
            del self._requests[rid]
        return stale

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def kv_bytes(self, request_id: str | None = None) -> int:
        if request_id is not None:
            return self._get(request_id).kv_bytes
        # list() copies in one step under the GIL: safe against the compute thread.
        return sum(r.kv_bytes for r in list(self._requests.values()))

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            len(self._requests), self.kv_bytes(), self.slice.weight_bytes, self._tokens_processed
        )

    # -- running ---------------------------------------------------------------

    def _get(self, request_id: str) -> _Request:
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
            UnknownRequest, InvalidActivation, PositionMismatch, ContextOverflow
        """
        req = self._get(request_id)
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
        try:
            out = self.slice(x, req.cache)
            if not self.slice.is_last:
                mx.eval(out, [c.state for c in req.cache])
                return to_host(out)
            if not sample:
                # Only the caches matter; the logits stay unevaluated and are dropped.
                mx.eval([c.state for c in req.cache])
                return None
            assert req.sampler is not None
            return req.sampler.sample(out)
        except (RuntimeError, ValueError) as exc:
            raise ComputeFailed(
                f"request {request_id!r} failed in layers "
                f"{self.slice.start}..{self.slice.end}: {exc}"
            ) from exc

    def logits(self, request_id: str, inputs: HostTensor | Sequence[int]) -> HostTensor:
        """Like ``run`` on the last slice, but return the last position's logits
        (float32) instead of sampling.

        Raises:
            UnknownRequest, InvalidActivation, ContextOverflow
        """
        if not self.slice.is_last:
            raise InvalidActivation("logits come only from the last slice")
        req = self._get(request_id)
        x = self._as_input(inputs)
        if req.position + x.shape[1] > req.max_context:
            raise ContextOverflow(f"request {request_id!r} would pass {req.max_context} positions")
        out = self.slice(x, req.cache)
        return to_host(out.astype(DTYPES["float32"]))
