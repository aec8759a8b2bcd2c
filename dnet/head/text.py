"""The text side of a generation, pure: prompts to token ids, and the ring's tokens
to text (streamed detokenization, stop strings) and logprob entries.

No peers, no I/O: a ``SessionText`` is fed ``Token`` messages and returns
``GenerationEvent``s, so all of it is testable with a tokenizer alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from dnet.errors import ContextOverflow, InvalidRequest
from dnet.head.stops import StopMatcher
from dnet.models.tokenizer import Tokenizer
from dnet.protocol.messages import Token


@attrs.frozen
class Prompt:
    """What to generate from: chat ``messages``, or ``text``, or token ``ids``."""

    messages: tuple[dict[str, str], ...] = ()
    text: str | None = None
    ids: tuple[int, ...] | None = None


def prompt_ids(tokenizer: Tokenizer, prompt: Prompt, context: int | None = None) -> list[int]:
    """Raises:
    InvalidRequest: a token id outside the vocabulary, or messages the chat
        template refuses.
    ContextOverflow: the text is too long for ``context`` tokens: found before
        tokenizing it, which takes far more memory than the text.
    """
    if context is not None:
        texts = [prompt.text or "", *(m["content"] for m in prompt.messages)]
        size = sum(len(t.encode()) for t in texts)
        if size > context * tokenizer.max_token_bytes:
            raise ContextOverflow(
                f"the prompt's {size} bytes of text are more than this model's context of "
                f"{context} tokens can hold"
            )
    if prompt.ids is not None:
        vocab = len(tokenizer)
        bad = next((t for t in prompt.ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary ({vocab})", "prompt")
        return list(prompt.ids)
    if prompt.text is not None:
        return tokenizer.encode(prompt.text)
    return tokenizer.chat_prompt([dict(m) for m in prompt.messages])


@attrs.frozen
class TokenLogprob:
    """A token's bytes and log-probability, with the most likely alternatives."""

    token: bytes
    logprob: float | None
    top: tuple[tuple[bytes, float], ...] = ()


@attrs.frozen
class GenerationEvent:
    """One generated token, the text it completes (possibly empty while a
    multi-byte character or a possible stop string is pending), its logprobs when
    asked for, and, on the last event, why generation finished (``stop`` or
    ``length``)."""

    index: int
    token_id: int
    text: str
    logprobs: TokenLogprob | None = None
    finish_reason: str | None = None


class SessionText:
    """Turns one request's tokens, in order, into ``GenerationEvent``s."""

    def __init__(
        self, tokenizer: Tokenizer, stop: Sequence[str] = (), *, logprobs: bool = False
    ) -> None:
        self._tokenizer = tokenizer
        self._stream = tokenizer.stream()
        self._stops = StopMatcher(stop)
        self._logprobs = logprobs

    def feed(self, token: Token) -> GenerationEvent:
        finish = token.finish_reason
        stops = self._stops
        if finish == "stop":  # a stop token: not part of the text
            text, _ = stops.feed(self._stream.finish())
            text += stops.flush()
        else:
            text, hit = stops.feed(self._stream.add(token.token_id))
            if hit:
                finish = "stop"
            elif finish == "length":
                more, hit = stops.feed(self._stream.finish())
                text += more + ("" if hit else stops.flush())
        return GenerationEvent(token.index, token.token_id, text, self._entry(token), finish)

    def _entry(self, token: Token) -> TokenLogprob | None:
        # A stop token ends the answer; like OpenAI, it has no logprobs entry.
        if not self._logprobs or (
            token.finish_reason == "stop" and token.token_id in self._tokenizer.eos_token_ids
        ):
            return None
        as_bytes = self._tokenizer.token_bytes
        return TokenLogprob(
            as_bytes(token.token_id),
            token.logprob,
            tuple((as_bytes(t), lp) for t, lp in token.top_logprobs),
        )
