"""OpenAI request bodies → validated values. Every refusal is an ``InvalidRequest``
naming the field (``param``), as OpenAI's own errors do.

Fields that change nothing here (``user``, ``metadata``, ``store``…) are accepted
and ignored, as chat front-ends send them; fields whose meaning dnet cannot honour
(tools, ``n`` > 1, penalties it does not implement) are refused, never ignored.
"""

from __future__ import annotations

import json
import math
from typing import Any

import attrs

from dnet.errors import InvalidRequest, InvalidSamplingParams
from dnet.head.serving import GenerationOptions
from dnet.head.text import Prompt
from dnet.sampling import MAX_TOP_LOGPROBS, SamplingParams

MAX_STOP_STRINGS = 16
MAX_JSON_DEPTH = 64  # an OpenAI request nests 5 or 6 deep (content parts)
ROLES = ("system", "developer", "user", "assistant", "tool")
_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "suffix", "audio")


@attrs.frozen
class GenerationRequest:
    """A chat (``messages``) or completion (``prompt``) request, as the head takes
    it, with how the answer should travel."""

    chat: bool
    model: str | None
    prompt: Prompt
    options: GenerationOptions
    stream: bool
    include_usage: bool


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (no recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            todo.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(data: bytes) -> dict[str, Any]:
    """Raises:
    InvalidRequest: not JSON, not an object, or nested deeper than ``MAX_JSON_DEPTH``.
    """
    too_deep = InvalidRequest(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(data)
    except RecursionError:
        raise too_deep from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if _depth(body) > MAX_JSON_DEPTH:
        raise too_deep
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _typed(body: dict[str, Any], name: str, kinds: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise InvalidRequest(f"'{name}' must be {what}, got a boolean", name, "invalid_type")
    if not isinstance(value, kinds):
        raise InvalidRequest(
            f"'{name}' must be {what}, got {type(value).__name__}", name, "invalid_type"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"'{name}' must be a finite number", name, "invalid_value")
    return value


def _number(body: dict[str, Any], name: str, lo: float, hi: float, default: float) -> float:
    value = _typed(body, name, (int, float), "a number")
    if value is None:
        return default
    if not lo <= value <= hi:
        raise InvalidRequest(
            f"'{name}' must be in [{lo}, {hi}], got {value}", name, "invalid_value"
        )
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    value = _typed(body, name, int, "an integer")
    if value is not None and (value < lo or (hi is not None and value > hi)):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InvalidRequest(f"'{name}' must be {bound}, got {value}", name, "invalid_value")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    return bool(_typed(body, name, bool, "a boolean"))


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, [], ""):
            raise InvalidRequest(
                f"'{name}' is not supported by dnet", name, "unsupported_parameter"
            )
    if _integer(body, "n", 1) not in (None, 1):
        raise InvalidRequest("only n=1 is supported", "n", "unsupported_value")
    if _integer(body, "best_of", 1) not in (None, 1):
        raise InvalidRequest("only best_of=1 is supported", "best_of", "unsupported_value")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, -2.0, 2.0, 0.0) != 0.0:
            raise InvalidRequest(
                f"'{name}' is not supported; use repetition_penalty", name, "unsupported_value"
            )
    if body.get("logit_bias"):
        raise InvalidRequest("'logit_bias' is not supported", "logit_bias", "unsupported_value")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        raise InvalidRequest(
            "only response_format {'type': 'text'} is supported",
            "response_format",
            "unsupported_value",
        )


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > MAX_STOP_STRINGS
    ):
        raise InvalidRequest(
            f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them",
            "stop",
            "invalid_value",
        )
    return tuple(stop)


def _sampling(body: dict[str, Any], logprobs: bool, top_logprobs: int) -> SamplingParams:
    top_k = _integer(body, "top_k", -1)
    try:
        return SamplingParams(
            temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
            top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
            top_k=0 if top_k is None or top_k == -1 else top_k,
            min_p=_number(body, "min_p", 0.0, 1.0, 0.0),
            repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0, 1.0),
            seed=_integer(body, "seed", 0, 2**63 - 1),
            top_logprobs=top_logprobs,
            logprobs=logprobs,
        )
    except InvalidSamplingParams as exc:
        raise InvalidRequest(exc.message, None, "invalid_value") from None


def _common(
    body: dict[str, Any], logprobs: bool, top_logprobs: int, max_tokens: int | None, echo: bool
) -> dict[str, Any]:
    _refuse_unsupported(body)
    model = _typed(body, "model", str, "a string")
    if not model:
        raise InvalidRequest("you must provide a model parameter", "model", "missing_required")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise InvalidRequest(
                "'stream_options' is only allowed with stream=true", "stream_options"
            )
        if not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object", "stream_options")
    return {
        "model": model,
        "options": GenerationOptions(
            params=_sampling(body, logprobs, top_logprobs),
            max_tokens=max_tokens,
            stop=_stop(body),
            logprobs=logprobs,
            echo=echo,
        ),
        "stream": stream,
        "include_usage": bool(options and _flag(options, "include_usage")),
    }


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(
                    f"messages[{i}]: only text content parts are supported, got {kind!r}",
                    f"messages[{i}].content",
                    "unsupported_value",
                )
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(
                    f"messages[{i}]: a text part needs a string 'text'", f"messages[{i}].content"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidRequest(
        f"messages[{i}].content must be a string or a list of content parts",
        f"messages[{i}].content",
        "invalid_type",
    )


def parse_chat(body: dict[str, Any]) -> GenerationRequest:
    """Raises:
    InvalidRequest
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list", "messages", "invalid_value")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidRequest(
                f"messages[{i}] needs a role, one of {', '.join(ROLES)}",
                f"messages[{i}].role",
                "invalid_value",
            )
        role = "system" if m["role"] == "developer" else m["role"]
        parsed.append({"role": role, "content": _content(m, i)})
    logprobs = _flag(body, "logprobs")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not logprobs:
        raise InvalidRequest("'top_logprobs' needs logprobs=true", "top_logprobs")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    return GenerationRequest(
        chat=True,
        prompt=Prompt(messages=tuple(parsed)),
        **_common(body, logprobs, top or 0, max_tokens, echo=False),
    )


def parse_completion(body: dict[str, Any]) -> GenerationRequest:
    """Raises:
    InvalidRequest
    """
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        prompt = tuple(prompt)
    elif not isinstance(prompt, str) or not prompt:
        raise InvalidRequest(
            "'prompt' must be a non-empty string (or one list of token ids)",
            "prompt",
            "invalid_value",
        )
    top = _integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    max_tokens = _integer(body, "max_tokens", 1) or 16  # OpenAI's default here
    return GenerationRequest(
        chat=False,
        prompt=Prompt(ids=prompt) if isinstance(prompt, tuple) else Prompt(text=prompt),
        **_common(body, top is not None, top or 0, max_tokens, _flag(body, "echo")),
    )
