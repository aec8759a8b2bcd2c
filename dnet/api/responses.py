"""OpenAI response shapes: completions, stream chunks, logprobs, usage, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from dnet.head.ring import GenerationEvent

TokenBytes = Callable[[int], bytes]


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


def _token_entry(token_bytes: TokenBytes, token_id: int, logprob: float | None) -> dict[str, Any]:
    raw = token_bytes(token_id)
    return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}


def chat_logprobs(events: list[GenerationEvent], token_bytes: TokenBytes) -> dict[str, Any]:
    content = []
    for e in events:
        entry = _token_entry(token_bytes, e.token_id, e.logprob)
        entry["top_logprobs"] = [_token_entry(token_bytes, t, lp) for t, lp in e.top_logprobs]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(
    events: list[GenerationEvent], token_bytes: TokenBytes, offset: int
) -> dict[str, Any]:
    tokens, offsets, tops = [], [], []
    for e in events:
        text = token_bytes(e.token_id).decode("utf-8", "replace")
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        tops.append({token_bytes(t).decode("utf-8", "replace"): lp for t, lp in e.top_logprobs})
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in events],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_completion(
    rid: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    use: dict[str, int],
    logprobs: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ],
        "usage": use,
        "system_fingerprint": None,
    }


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    *,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    with_usage: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
        "system_fingerprint": None,
    }
    if with_usage:
        chunk["usage"] = None  # OpenAI sends null until the closing usage chunk
    return chunk


def completion(
    rid: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    use: dict[str, int] | None,
    logprobs: dict[str, Any] | None,
    *,
    stream: bool = False,
    with_usage: bool = False,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
        "system_fingerprint": None,
    }
    if not stream or with_usage:
        body["usage"] = use
    return body


def usage_chunk(rid: str, created: int, model: str, obj: str, use: dict[str, int]) -> dict:
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": use,
        "system_fingerprint": None,
    }


def error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
