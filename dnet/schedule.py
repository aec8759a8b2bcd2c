"""How a prompt is fed: shared by the in-process chain and the head."""

from __future__ import annotations


def prefill_schedule(num_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """The spans mlx_lm prefills a prompt in: all but the last token in chunks of
    ``chunk``, then the last token alone (its logits give the first new token).
    Following it keeps the sliced runtime's numerics identical to mlx_lm's."""
    if num_tokens < 1 or chunk < 1:
        raise ValueError("need at least one token and a positive chunk size")
    spans, pos = [], 0
    while num_tokens - pos > 1:
        n = min(chunk, num_tokens - pos - 1)
        spans.append((pos, pos + n))
        pos += n
    spans.append((pos, num_tokens))
    return spans
