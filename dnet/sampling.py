"""Sampling parameters of one request: a validated value shared by every layer."""

from __future__ import annotations

import attrs

from dnet.errors import InvalidSamplingParams

MAX_TOP_LOGPROBS = 20


@attrs.frozen
class SamplingParams:
    """How the last slice picks the next token.

    ``temperature == 0`` is greedy. ``top_k == 0``, ``top_p == 1`` and ``min_p == 0``
    turn those filters off; ``repetition_penalty == 1`` turns the penalty off.
    ``seed`` makes sampling reproducible per request; ``None`` draws a fresh one.
    ``logprobs`` asks for each token's log-probability (a pass over the whole
    vocabulary per token); ``top_logprobs`` for that many alternatives with it.

    Raises:
        InvalidSamplingParams: a field out of its range.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    seed: int | None = None
    top_logprobs: int = 0
    logprobs: bool = False

    def __attrs_post_init__(self) -> None:
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repetition_context_size < 1:
            problems.append(
                f"repetition_context_size must be >= 1, got {self.repetition_context_size}"
            )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            problems.append(f"seed must be in [0, 2**63), got {self.seed}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            problems.append(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        if problems:
            raise InvalidSamplingParams("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@attrs.frozen
class SampledToken:
    """One sampled token: its id, its log-probability under the model (before
    filtering; ``None`` unless the request asked for logprobs), and the
    ``top_logprobs`` most likely alternatives as (id, logprob)."""

    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...] = ()
