"""Sampling on the last slice, from mlx_lm's own filters and logits processors.

Each request keeps its own random key, so a seeded request draws the same tokens
however many other requests share the process.
"""

from __future__ import annotations

import math
import secrets
from typing import cast

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from dnet.sampling import SampledToken, SamplingParams

# Significand bits (with the implicit one) of the dtypes logits come in.
_SIGNIFICAND = {mx.float32: 24, mx.float16: 11, mx.bfloat16: 8}


def clear_argmax(logits: mx.array) -> int | None:
    """The token mlx_lm's greedy sampler picks from ``logits`` (``[1, vocab]``),
    found without normalising them, or ``None`` when that cannot be shown.

    mlx_lm takes the argmax of ``logits - logsumexp(logits)``, computed in the
    logits' dtype: one pass of ``exp`` over the vocabulary, ~4.5 ms a token for
    Qwen3's 151,936 on this CPU backend, where MLX runs it one element at a time.
    The raw argmax is the same token when the top two logits ``a > b`` are far
    enough apart that the subtraction cannot round them together. Let ``c`` be the
    computed logsumexp: ``c >= a`` (its sum includes ``exp(0) = 1``) and
    ``c - a <= log(vocab)`` (plus rounding). Rounding is monotonic, and two
    values ``a - b`` apart stay apart after rounding to a grid coarser by at most
    ``ulp(|b - c|) <= |b - c| * 2**(1 - bits)``, with ``|b - c| <= (a - b) +
    log(vocab) + 1``. Under a margin of 2 the raw argmax is taken; otherwise
    (near-ties, non-finite values, unknown dtypes) the caller normalises.
    """
    bits = _SIGNIFICAND.get(logits.dtype)
    if bits is None:
        return None
    row = np.array(logits.astype(mx.float32)).reshape(-1)  # exact for these dtypes
    best = int(np.argmax(row))
    top = float(row[best])
    row[best] = -np.inf
    second = float(np.max(row))
    if not (math.isfinite(top) and math.isfinite(second)):
        return None
    gap = top - second
    if gap > 2.0 * (gap + math.log(row.size) + 1.0) * 2.0 ** (1 - bits):
        return best
    return None


class RequestSampler:
    """Turns last-position logits into tokens for one request."""

    def __init__(self, params: SamplingParams, prompt_tokens: list[int]) -> None:
        self.params = params
        self.history = list(prompt_tokens)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._key = mx.random.key(seed)
        penalty = params.repetition_penalty if params.repetition_penalty != 1.0 else None
        self._processors = make_logits_processors(
            repetition_penalty=penalty, repetition_context_size=params.repetition_context_size
        )

    def _filter(self, logprobs: mx.array) -> mx.array:
        p = self.params
        if 0 < p.top_p < 1.0:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p > 0.0:
            logprobs = apply_min_p(logprobs, p.min_p)
        if 0 < p.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, p.top_k)
        return logprobs

    def sample(self, logits: mx.array) -> SampledToken:
        """Pick a token from ``logits`` of shape ``[1, vocab]`` and remember it."""
        if self._processors and self.history:
            tokens = mx.array(self.history[-self.params.repetition_context_size :])
            for processor in self._processors:
                logits = processor(tokens, logits)
        if self.params.greedy and not (self.params.logprobs or self.params.top_logprobs):
            picked = clear_argmax(logits)
            if picked is not None:
                self.history.append(picked)
                return SampledToken(picked, None)
        # Normalise before argmax as mlx_lm does: in bfloat16 the raw argmax can differ.
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.params.greedy:
            token = mx.argmax(logprobs, axis=-1)
        else:
            self._key, sub = mx.random.split(self._key)
            scaled = self._filter(logprobs) * (1.0 / self.params.temperature)
            token = mx.random.categorical(scaled, key=sub)
        k = self.params.top_logprobs
        if k:
            top = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
            mx.eval(token, logprobs, top)
            ids = cast(list[int], top[0].tolist())
            values = cast(list[float], logprobs[0, top[0]].astype(mx.float32).tolist())
            pairs = sorted(zip(ids, values, strict=True), key=lambda kv: -kv[1])
            top_pairs = tuple((int(i), float(v)) for i, v in pairs)
        else:
            mx.eval(token, logprobs)
            top_pairs = ()
        token_id = cast(int, token.item())
        logprob = None
        if self.params.logprobs or k:
            logprob = cast(float, logprobs[0, token_id].astype(mx.float32).item())
        self.history.append(token_id)
        return SampledToken(token_id, logprob, top_pairs)

    def forget(self, n: int) -> None:
        """Drop the last ``n`` tokens from the history (after a trim)."""
        if n > 0:
            del self.history[-n:]
