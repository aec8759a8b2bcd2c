"""OpenAI response shapes: one ``Reply`` describes an answer (endpoint, id, model,
prompt size, echo, usage in streams) and builds its bodies, chunks and logprobs
from the head's ``GenerationEvent``s."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs

from dnet.head.text import GenerationEvent, TokenLogprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: {json}`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _chat_entry(raw: bytes, logprob: float | None) -> dict[str, Any]:
    return {"token": _text(raw), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    content = []
    for e in entries:
        entry = _chat_entry(e.token, e.logprob)
        entry["top_logprobs"] = [_chat_entry(t, lp) for t, lp in e.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens, offsets = [], []
    for e in entries:
        tokens.append(_text(e.token))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{_text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


@attrs.define
class Reply:
    """One answer of ``/v1/chat/completions`` (``chat``) or ``/v1/completions``."""

    chat: bool
    id: str
    created: int
    model: str
    prompt_tokens: int
    include_usage: bool = False  # streams: a closing usage chunk
    logprobs: bool = False  # asked for (an answer of only a stop token has none)
    echo: str = ""  # completions: the prompt's text leads the answer
    _offset: int = 0  # completions: text offset of the next streamed token

    def __attrs_post_init__(self) -> None:
        self._offset = len(self.echo)

    def _envelope(self, obj: str, choices: list[Any], **tail: Any) -> dict[str, Any]:
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.model}
        return {**head, "choices": choices, **tail}

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def whole(self, events: Sequence[GenerationEvent]) -> dict[str, Any]:
        """The body of a non-streamed answer."""
        text = "".join(e.text for e in events)
        finish = events[-1].finish_reason if events else None
        entries = [e.logprobs for e in events if e.logprobs is not None]
        use = usage(self.prompt_tokens, len(events))
        if self.chat:
            lp = chat_logprobs(entries) if self.logprobs else None
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}
            return self._envelope("chat.completion", [choice], usage=use, system_fingerprint=None)
        lp = completion_logprobs(entries, len(self.echo)) if self.logprobs else None
        return self._completion(self.echo + text, finish, lp, use, stream=False)

    def _completion(
        self, text: str, finish: str | None, lp: Any, use: Any, *, stream: bool
    ) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        body = self._envelope("text_completion", [choice], system_fingerprint=None)
        if not stream or self.include_usage:
            body["usage"] = use
        return body

    def _chat_chunk(self, delta: dict[str, Any], finish: str | None, lp: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        body = self._envelope("chat.completion.chunk", [choice], system_fingerprint=None)
        if self.include_usage:
            body["usage"] = None  # OpenAI sends null until the closing usage chunk
        return body

    def opening(self) -> dict[str, Any] | None:
        """A stream's first chunk: the assistant's role, or the echoed prompt."""
        if self.chat:
            return self._chat_chunk({"role": "assistant", "content": ""}, None, None)
        return self._completion(self.echo, None, None, None, stream=True) if self.echo else None

    def chunk(self, e: GenerationEvent) -> dict[str, Any] | None:
        """The chunk of one event; None when it has nothing to say."""
        entries = [e.logprobs] if e.logprobs is not None else []
        if self.chat:
            lp = chat_logprobs(entries) if entries else None
        else:
            lp = completion_logprobs(entries, self._offset) if entries else None
            self._offset += len(e.text)
        if not (e.text or lp is not None or e.finish_reason):
            return None
        if self.chat:
            return self._chat_chunk({"content": e.text} if e.text else {}, e.finish_reason, lp)
        return self._completion(e.text, e.finish_reason, lp, None, stream=True)

    def closing(self, completion_tokens: int) -> dict[str, Any] | None:
        """A stream's usage chunk, when asked for."""
        if not self.include_usage:
            return None
        use = usage(self.prompt_tokens, completion_tokens)
        return self._envelope(self._chunk_object(), [], usage=use, system_fingerprint=None)
