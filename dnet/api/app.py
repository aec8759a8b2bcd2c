"""The Quart-trio app: OpenAI endpoints and the cluster endpoints, over a Coordinator.

Errors leave in one place (``_error_response``): every ``DnetError`` becomes
OpenAI's error shape with an honest status code.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import AsyncExitStack, aclosing
from typing import Any

import attrs
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from dnet.api.logs import LogBuffer
from dnet.api.requests import GenerationRequest, parse_chat, parse_completion, parse_json
from dnet.api.responses import (
    chat_chunk,
    chat_completion,
    chat_logprobs,
    completion,
    completion_logprobs,
    error_body,
    sse,
    usage,
    usage_chunk,
)
from dnet.errors import (
    ContextOverflow,
    DnetError,
    InvalidModel,
    InvalidRequest,
    InvalidSamplingParams,
    LayerRangeError,
    ModelNotFound,
    ModelNotLoaded,
    OverCapacity,
    PeerError,
    PeerUnavailable,
    UnsupportedArchitecture,
)
from dnet.head.coordinator import Coordinator, topology_from_json
from dnet.head.ring import GenerationEvent
from dnet.head.topology import topology_json
from dnet.solver.profiles import NoFeasiblePlan

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
STATUS_HEARTBEAT_S = 1.0
STATUS_MIN_INTERVAL_S = 0.05

# (error class, HTTP status, OpenAI error type); the first match wins.
_STATUS: tuple[tuple[type[DnetError], int, str], ...] = (
    (InvalidRequest, 400, "invalid_request_error"),
    (ContextOverflow, 400, "invalid_request_error"),
    (InvalidSamplingParams, 400, "invalid_request_error"),
    (LayerRangeError, 400, "invalid_request_error"),
    (ModelNotFound, 404, "invalid_request_error"),
    (InvalidModel, 400, "invalid_request_error"),
    (UnsupportedArchitecture, 400, "invalid_request_error"),
    (NoFeasiblePlan, 409, "invalid_request_error"),
    (OverCapacity, 429, "rate_limit_error"),
    (ModelNotLoaded, 503, "server_error"),
    (PeerError, 502, "server_error"),
    (PeerUnavailable, 503, "server_error"),
)
_CODES = {ContextOverflow: "context_length_exceeded", OverCapacity: "rate_limit_exceeded"}


def error_status(exc: DnetError) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-shaped body for ``exc``."""
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            code = _CODES.get(cls, exc.code)
            return status, error_body(exc.message, kind, code, getattr(exc, "param", None))
    return 500, error_body(exc.message, "server_error", exc.code)


def _error_response(exc: DnetError) -> Response:
    status, body = error_status(exc)
    if status >= 500:
        log.warning("%s: %s", exc.code, exc.message)
    return _json(body, status)


def _json(body: Any, status: int = 200) -> Response:
    import json

    return Response(json.dumps(body), status=status, content_type="application/json")


class _StreamBody:
    """A streamed response's body. Closing it (Quart does when the client goes, or
    when the stream ends) ends the generation on every peer and frees the slot."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], cleanup: AsyncExitStack) -> None:
        self._chunks = chunks
        self._cleanup = cleanup
        self._closed = False

    def __aiter__(self) -> _StreamBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await self._chunks.aclose()
            finally:
                await self._cleanup.aclose()


def create_app(
    coordinator: Coordinator,
    *,
    api_key: str | None = None,
    logs: LogBuffer | None = None,
    cors_origin: str | None = None,
) -> QuartTrio:
    """The app. ``cors_origin`` lets browser front-ends of that origin (or ``*``)
    call the API; off by default, so that web pages cannot reach a local head."""
    app = QuartTrio("dnet")
    app.config["RESPONSE_TIMEOUT"] = None  # a stream lasts as long as its generation
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.before_request
    async def check_api_key() -> Response | None:
        if request.method == "OPTIONS" and cors_origin is not None:
            return Response("", status=204)  # a CORS preflight carries no credentials
        if api_key is None or not request.path.startswith("/v1"):
            return None
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return _json(
                error_body(
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    "invalid_request_error",
                    "invalid_api_key",
                ),
                401,
            )
        return None

    @app.after_request
    async def allow_origin(response: Response) -> Response:
        if cors_origin is not None:
            response.headers["Access-Control-Allow-Origin"] = cors_origin
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        return response

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        return _json(
            error_body(exc.description or exc.name, "invalid_request_error", exc.name), status
        )

    @app.errorhandler(DnetError)
    async def dnet_error(exc: DnetError) -> Response:
        return _error_response(exc)

    async def body() -> dict[str, Any]:
        data = await request.get_data(as_text=False)
        return parse_json(data if isinstance(data, bytes) else data.encode())

    @app.get("/health")
    async def health() -> Response:
        stats = coordinator.statistics()
        return _json(
            {
                "status": "ok",
                "state": stats.state,
                "model": stats.model,
                "peers": len(coordinator.ring.peers),
            }
        )

    @app.get("/v1/devices")
    async def devices() -> Response:
        return _json({"object": "list", "data": await coordinator.devices()})

    @app.post("/v1/prepare_topology")
    async def prepare() -> Response:
        data = await body()
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest(
                "'model' must name a model: a directory, a .gguf file, a repo id or smollm2-135m",
                "model",
            )
        context = data.get("context", data.get("max_context"))
        if context is not None and (not isinstance(context, int) or context < 1):
            raise InvalidRequest("'context' must be a positive integer", "context")
        objective = data.get("objective")
        if objective not in (None, "latency", "throughput"):
            raise InvalidRequest("'objective' must be latency or throughput", "objective")
        compute_dtype = data.get("compute_dtype")
        if compute_dtype not in (None, "float32", "float16", "bfloat16"):
            raise InvalidRequest(
                "'compute_dtype' must be float32, float16 or bfloat16", "compute_dtype"
            )
        topology = await coordinator.prepare(
            model, context=context, objective=objective, compute_dtype=compute_dtype
        )
        return _json(topology_json(topology))

    @app.get("/v1/topology")
    async def topology() -> Response:
        if coordinator.topology is None:
            return _json(
                error_body(
                    "no topology yet: POST /v1/prepare_topology",
                    "invalid_request_error",
                    "no_topology",
                ),
                404,
            )
        return _json(topology_json(coordinator.topology))

    @app.post("/v1/load_model")
    async def load_model() -> Response:
        data = await body()
        if "assignments" in data:
            result = await coordinator.load(topology=topology_from_json(data))
        elif isinstance(data.get("topology"), dict):
            result = await coordinator.load(
                model=data.get("model"), topology=topology_from_json(data["topology"])
            )
        else:
            model = data.get("model")
            if not isinstance(model, str) or not model:
                raise InvalidRequest("give 'model', or a topology from prepare_topology", "model")
            result = await coordinator.load(model=model)
        return _json(result)

    @app.post("/v1/unload_model")
    async def unload_model() -> Response:
        await coordinator.unload()
        return _json({"status": "unloaded"})

    @app.get("/v1/models")
    async def models() -> Response:
        model = coordinator.model
        data = [_model_entry(model)] if model is not None else []
        return _json({"object": "list", "data": data})

    @app.get("/v1/models/<path:name>")
    async def model_info(name: str) -> Response:
        return _json(_model_entry(coordinator.resolve_model(name)))

    def status_body() -> dict[str, Any]:
        stats = attrs.asdict(coordinator.statistics())
        stats["load_progress"] = {k: list(v) for k, v in stats["load_progress"].items()}
        return {
            "head": stats,
            "model": attrs.asdict(coordinator.model) if coordinator.model else None,
            "topology": topology_json(coordinator.topology) if coordinator.topology else None,
        }

    @app.get("/v1/status")
    async def status() -> Response:
        return _json(status_body())

    @app.get("/v1/status/stream")
    async def status_stream() -> Response:
        """The status as server-sent events: at once, on every change (state, load
        progress, requests), and at least every ``STATUS_HEARTBEAT_S``."""

        async def events() -> AsyncGenerator[bytes, None]:
            while True:
                changed = coordinator.changed
                yield sse(status_body())
                await trio.sleep(STATUS_MIN_INTERVAL_S)  # a burst of changes: one event
                with trio.move_on_after(STATUS_HEARTBEAT_S):
                    await changed.wait()  # already set if something changed meanwhile

        return _sse_response(events())

    @app.get("/v1/logs")
    async def log_lines() -> Response:
        try:
            after = int(request.args.get("after", "0"))
        except ValueError:
            raise InvalidRequest("'after' must be an integer", "after") from None
        next_seq, lines = logs.after(after) if logs is not None else (0, [])
        return _json({"next": next_seq, "lines": lines})

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        return await _generate(coordinator, parse_chat(await body()), chat=True)

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await _generate(coordinator, parse_completion(await body()), chat=False)

    return app


def _model_entry(model: Any) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": "dnet",
        "architecture": model.architecture,
        "num_layers": model.num_layers,
        "context_length": model.context,
    }


async def _prompt(coordinator: Coordinator, req: GenerationRequest, chat: bool) -> list[int]:
    from dnet.runtime.tokenizer import chat_prompt

    tokenizer = coordinator.tokenizer
    if chat:
        messages = [dict(m) for m in req.messages]
        return await trio.to_thread.run_sync(chat_prompt, tokenizer, messages)
    if isinstance(req.prompt, tuple):
        vocab = len(tokenizer)
        bad = next((t for t in req.prompt if t >= vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is outside the vocabulary ({vocab})", "prompt")
        return list(req.prompt)
    return list(await trio.to_thread.run_sync(tokenizer.encode, req.prompt))


async def _generate(coordinator: Coordinator, req: GenerationRequest, *, chat: bool) -> Response:
    model = coordinator.resolve_model(req.model)
    prompt = await _prompt(coordinator, req, chat)
    max_tokens = coordinator.token_limit(len(prompt), req.max_tokens)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    eos = coordinator.tokenizer.eos_token_ids
    from dnet.runtime.tokenizer import token_bytes

    tokenizer = coordinator.tokenizer

    def tb(token_id: int) -> bytes:
        return token_bytes(tokenizer, token_id)

    def scored(e: GenerationEvent) -> bool:
        # A stop token ends the answer; like OpenAI, it has no logprobs entry.
        return req.logprobs and not (e.finish_reason == "stop" and e.token_id in eos)

    cleanup = AsyncExitStack()
    async with cleanup:
        await cleanup.enter_async_context(coordinator.admitted())
        events = await cleanup.enter_async_context(
            aclosing(coordinator.generate(prompt, req.params, max_tokens=max_tokens, stop=req.stop))
        )
        # The first token before any byte is sent: an early failure gets its status.
        first = await events.__anext__()
        if req.stream:
            if chat:
                chunks = _chat_stream(req, rid, created, model.id, len(prompt), tb, scored)
            else:
                prefix = tokenizer.decode(prompt) if req.echo else ""
                chunks = _completion_stream(
                    req, rid, created, model.id, len(prompt), tb, scored, prefix
                )
            body = _sse_chunks(first, events, **chunks)
            return _sse_response(_StreamBody(body, cleanup.pop_all()))
        got = [first]
        if first.finish_reason is None:
            got.extend([e async for e in events])
    text = "".join(e.text for e in got)
    use = usage(len(prompt), len(got))
    finish = got[-1].finish_reason
    picked = [e for e in got if scored(e)]
    if chat:
        lp = chat_logprobs(picked, tb) if req.logprobs else None
        return _json(chat_completion(rid, created, model.id, text, finish, use, lp))
    prefix = tokenizer.decode(prompt) if req.echo else ""
    lp = completion_logprobs(picked, tb, len(prefix)) if req.logprobs else None
    return _json(completion(rid, created, model.id, prefix + text, finish, use, lp))


async def _rest(first: GenerationEvent, events: Any) -> AsyncGenerator[GenerationEvent, None]:
    yield first
    if first.finish_reason is None:
        async for e in events:
            yield e


async def _sse_chunks(
    first: GenerationEvent,
    events: Any,
    *,
    opening: dict[str, Any] | None,
    chunk: Callable[[GenerationEvent], dict[str, Any] | None],
    closing: Callable[[int], dict[str, Any]] | None,
) -> AsyncGenerator[bytes, None]:
    """The stream of either endpoint: an ``opening`` chunk, ``chunk(event)`` for each
    event that has something to say, ``closing(tokens)`` (usage), then ``[DONE]``;
    a failure mid-stream is an error event and the end."""
    n = 0
    if opening is not None:
        yield sse(opening)
    try:
        async with aclosing(_rest(first, events)) as rest:
            async for e in rest:
                n += 1
                body = chunk(e)
                if body is not None:
                    yield sse(body)
    except DnetError as exc:
        yield sse(error_status(exc)[1])
        return
    if closing is not None:
        yield sse(closing(n))
    yield sse("[DONE]")


def _sse_response(body: Any) -> Response:
    return Response(
        body,
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _chat_stream(req, rid, created, model, prompt_tokens, tb, scored) -> dict[str, Any]:
    def chunk(e: GenerationEvent) -> dict[str, Any] | None:
        lp = chat_logprobs([e], tb) if scored(e) else None
        if not (e.text or lp is not None or e.finish_reason):
            return None
        delta = {"content": e.text} if e.text else {}
        return chat_chunk(
            rid,
            created,
            model,
            delta,
            finish_reason=e.finish_reason,
            logprobs=lp,
            with_usage=req.include_usage,
        )

    def closing(n: int) -> dict[str, Any]:
        return usage_chunk(rid, created, model, "chat.completion.chunk", usage(prompt_tokens, n))

    opening = chat_chunk(
        rid, created, model, {"role": "assistant", "content": ""}, with_usage=req.include_usage
    )
    return {"opening": opening, "chunk": chunk, "closing": closing if req.include_usage else None}


def _completion_stream(
    req, rid, created, model, prompt_tokens, tb, scored, prefix: str
) -> dict[str, Any]:
    offset = len(prefix)

    def piece(text: str, finish: str | None, lp: dict[str, Any] | None) -> dict[str, Any]:
        return completion(
            rid,
            created,
            model,
            text,
            finish,
            None,
            lp,
            stream=True,
            with_usage=req.include_usage,
        )

    def chunk(e: GenerationEvent) -> dict[str, Any] | None:
        nonlocal offset
        lp = completion_logprobs([e], tb, offset) if scored(e) else None
        offset += len(e.text)
        if not (e.text or lp is not None or e.finish_reason):
            return None
        return piece(e.text, e.finish_reason, lp)

    def closing(n: int) -> dict[str, Any]:
        return usage_chunk(rid, created, model, "text_completion", usage(prompt_tokens, n))

    return {
        "opening": piece(prefix, None, None) if prefix else None,  # echo
        "chunk": chunk,
        "closing": closing if req.include_usage else None,
    }
