"""A session's text side without peers: tokens in, text, stops and logprobs out."""

from __future__ import annotations

import pytest

from dnet.errors import ContextOverflow, InvalidRequest
from dnet.head.text import Prompt, SessionText, prompt_ids
from dnet.models.tokenizer import load_tokenizer
from dnet.protocol.messages import Token


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model(arch="qwen3", layers=2))


def tokens(ids, *, last=None, logprob=None, top=()):
    """``Token`` messages for ``ids``; the last finishes with ``last``."""
    return [
        Token("r", t, logprob, top, last if i == len(ids) - 1 else None, i)
        for i, t in enumerate(ids)
    ]


def run(text: SessionText, messages) -> list:
    return [text.feed(m) for m in messages]


def test_text_streams_and_a_character_waits_for_all_its_bytes(tokenizer):
    words = "The fox 🦊 said: naïve!"
    ids = tokenizer.encode(words)
    fox = tokenizer.encode("🦊")
    assert len(fox) > 1  # several byte tokens: one character split across tokens
    events = run(SessionText(tokenizer), tokens(ids, last="length"))
    assert "".join(e.text for e in events) == words
    assert all("\ufffd" not in e.text for e in events)
    held = [e for e in events if e.text == ""]
    assert len(held) >= len(fox) - 1  # the emoji's first bytes give no text yet
    assert [e.index for e in events] == list(range(len(ids)))
    assert events[-1].finish_reason == "length" and all(
        e.finish_reason is None for e in events[:-1]
    )


def test_a_stop_string_split_across_tokens_is_cut_and_never_streamed(tokenizer):
    ids = tokenizer.encode("one two THE END three")
    stop = "THE END"
    # The stop string spans tokens: no single token holds it.
    assert all(stop not in tokenizer.decode([i]) for i in ids)
    events = []
    text = SessionText(tokenizer, [stop])
    for message in tokens(ids):
        events.append(text.feed(message))
        if events[-1].finish_reason:
            break
    assert events[-1].finish_reason == "stop"
    streamed = "".join(e.text for e in events)
    assert streamed == "one two "
    assert not any("THE" in e.text for e in events)  # held back while it might match
    assert len(events) < len(ids)  # generation stops at the match


def test_a_held_back_prefix_that_does_not_match_is_flushed(tokenizer):
    ids = tokenizer.encode("one two THE ENTRY")
    events = run(SessionText(tokenizer, ["THE END"]), tokens(ids, last="length"))
    assert "".join(e.text for e in events) == "one two THE ENTRY"
    assert events[-1].finish_reason == "length"


def test_the_stop_token_ends_the_text_and_has_no_logprobs(tokenizer):
    eos = min(tokenizer.eos_token_ids)
    ids = [*tokenizer.encode("Hello"), eos]
    events = run(
        SessionText(tokenizer, logprobs=True),
        tokens(ids, last="stop", logprob=-0.5, top=((eos, -0.5), (ids[0], -1.5))),
    )
    assert "".join(e.text for e in events) == "Hello"
    assert events[-1].finish_reason == "stop" and events[-1].logprobs is None
    first = events[0].logprobs
    assert first is not None and first.logprob == -0.5
    assert first.token == tokenizer.token_bytes(ids[0])
    assert first.top == ((tokenizer.token_bytes(eos), -0.5), (tokenizer.token_bytes(ids[0]), -1.5))
    # The bytes of the scored tokens spell the text, a character split or not.
    assert b"".join(e.logprobs.token for e in events[:-1]) == b"Hello"


def test_logprob_bytes_of_a_split_character(tokenizer):
    ids = tokenizer.encode("🦊")
    events = run(SessionText(tokenizer, logprobs=True), tokens(ids, last="length", logprob=-1.0))
    pieces = [e.logprobs.token for e in events]
    assert b"".join(pieces) == "🦊".encode()
    assert all(len(p) < 4 for p in pieces)  # no piece is the whole character


def test_no_logprobs_unless_asked(tokenizer):
    events = run(SessionText(tokenizer), tokens(tokenizer.encode("Hi"), logprob=-1.0))
    assert all(e.logprobs is None for e in events)


def test_prompts_as_text_ids_and_chats(tokenizer):
    assert prompt_ids(tokenizer, Prompt(text="Hi")) == tokenizer.encode("Hi")
    assert prompt_ids(tokenizer, Prompt(ids=(1, 2, 3))) == [1, 2, 3]
    chat = ({"role": "user", "content": "Hi"},)
    assert prompt_ids(tokenizer, Prompt(messages=chat)) == tokenizer.chat_prompt(list(chat))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        prompt_ids(tokenizer, Prompt(ids=(1, len(tokenizer))))


def test_a_text_too_long_for_the_context_is_refused_before_tokenizing(tokenizer):
    fits = "fox " * 100
    assert prompt_ids(tokenizer, Prompt(text=fits), context=4096) == tokenizer.encode(fits)
    # Longer than 4096 of the vocabulary's longest tokens: cannot fit, whatever it is.
    huge = "x" * (4096 * tokenizer.max_token_bytes + 1)
    with pytest.raises(ContextOverflow, match="context of 4096 tokens"):
        prompt_ids(tokenizer, Prompt(messages=({"role": "user", "content": huge},)), context=4096)
    assert max(len(tokenizer.token_bytes(i)) for i in range(len(tokenizer))) <= (
        tokenizer.max_token_bytes
    )
