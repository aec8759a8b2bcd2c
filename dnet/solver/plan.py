"""The solver's answer."""

from __future__ import annotations

import attrs


@attrs.frozen
class Assignment:
    peer_id: str
    name: str
    start: int
    end: int
    stage_s: float  # predicted time of this slice for one decode token
    memory_bytes: int  # weights + KV at the target context


@attrs.frozen
class Exclusion:
    peer_id: str
    name: str
    reason: str


@attrs.frozen
class Plan:
    """Peers in ring order with their layer ranges, and what the model predicts."""

    objective: str
    assignments: tuple[Assignment, ...]
    excluded: tuple[Exclusion, ...]
    token_latency_s: float  # one decode step around the ring, links included
    tokens_per_s: float  # one stream for "latency"; pipelined streams for "throughput"
    ttft_s: float  # time to first token for ``prompt_tokens``
    prompt_tokens: int
    context: int
    split_reason: str | None = None  # why more than one peer holds the model

    @property
    def cost(self) -> float:
        """What the objective minimised."""
        if self.objective == "latency":
            return self.token_latency_s
        return 1.0 / self.tokens_per_s
