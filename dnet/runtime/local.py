"""A chain of slices in one process: the ring without the network.

Used by the local generation command, the parity tests and the runtime benchmark.
Activations cross each slice boundary as ``HostTensor`` bytes, exactly as they will
cross the wire between peers.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from dnet.errors import LayerRangeError
from dnet.models.model_dir import ModelDir, open_model_dir
from dnet.runtime.engine import SliceEngine
from dnet.runtime.slice import load_slice
from dnet.sampling import SampledToken, SamplingParams
from dnet.schedule import prefill_schedule

DEFAULT_PREFILL_CHUNK = 2048


def even_cuts(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """Split ``num_layers`` into ``parts`` contiguous ranges, earlier ones larger.

    Raises:
        LayerRangeError: more parts than layers, or fewer than one.
    """
    if not 1 <= parts <= num_layers:
        raise LayerRangeError(f"cannot cut {num_layers} layers into {parts} slices")
    base, extra = divmod(num_layers, parts)
    cuts, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        cuts.append((start, end))
        start = end
    return cuts


def load_chain(
    model: ModelDir | str | Path,
    cuts: Sequence[tuple[int, int]],
    compute_dtype: str | None = None,
) -> list[SliceEngine]:
    """Load one engine per range; the ranges must tile ``[0, num_layers)`` in order.
    ``compute_dtype`` widens weights at load (see ``load_slice``).

    Raises:
        LayerRangeError: ranges with gaps or overlaps, or not covering the model.
    """
    if not isinstance(model, ModelDir):
        model = open_model_dir(model)
    expected = 0
    for start, end in cuts:
        if start != expected:
            raise LayerRangeError(
                f"slice ranges {list(cuts)} leave a gap or overlap at layer {expected}"
            )
        expected = end
    if expected != model.num_layers:
        raise LayerRangeError(f"slice ranges {list(cuts)} do not cover {model.num_layers} layers")
    return [SliceEngine(load_slice(model, s, e, compute_dtype=compute_dtype)) for s, e in cuts]


def generate(
    engines: Sequence[SliceEngine],
    prompt: Sequence[int],
    max_tokens: int,
    params: SamplingParams | None = None,
    *,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    stop_tokens: Sequence[int] = (),
) -> Iterator[SampledToken]:
    """Generate up to ``max_tokens`` tokens, passing activations slice to slice.

    Stops after yielding a token in ``stop_tokens``. Frees every slice's caches at
    the end, also when the caller stops early.
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    rid = uuid.uuid4().hex
    for engine in engines:
        engine.start(rid, params, prompt_tokens=prompt)
    try:
        spans = prefill_schedule(len(prompt), prefill_chunk)
        token: SampledToken | None = None
        for i, (a, b) in enumerate(spans):
            token = _through(engines, rid, prompt[a:b], a, sample=i == len(spans) - 1)
        position = len(prompt)
        for n in range(max_tokens):
            assert token is not None
            yield token
            if token.token_id in stop_tokens or n == max_tokens - 1:
                return
            token = _through(engines, rid, [token.token_id], position, sample=True)
            position += 1
    finally:
        for engine in engines:
            engine.end(rid)


def _through(
    engines: Sequence[SliceEngine], rid: str, tokens: Sequence[int], position: int, sample: bool
) -> SampledToken | None:
    x: object = tokens
    for engine in engines:
        x = engine.run(rid, x, position=position, sample=sample)  # type: ignore[arg-type]
    return x  # type: ignore[return-value]
