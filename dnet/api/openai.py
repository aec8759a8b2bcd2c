"""The OpenAI endpoints: models, chat completions and completions. They parse the
request, open a generation on the head, and shape its events as JSON."""

from __future__ import annotations

import time
import uuid
from contextlib import AsyncExitStack
from typing import Any

from quart import Blueprint, Response

from dnet.api.context import head, request_json
from dnet.api.errors import json_response
from dnet.api.requests import GenerationRequest, parse_chat, parse_completion
from dnet.api.responses import Reply
from dnet.api.streaming import StreamBody, generation_events, sse_response
from dnet.head.results import LoadedModel

openai = Blueprint("openai", __name__)


def model_entry(model: LoadedModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": "dnet",
        "architecture": model.architecture,
        "num_layers": model.num_layers,
        "context_length": model.context,
    }


@openai.get("/v1/models")
async def models() -> Response:
    model = head().coordinator.model
    return json_response({"object": "list", "data": [model_entry(model)] if model else []})


@openai.get("/v1/models/<path:name>")
async def model_info(name: str) -> Response:
    model, _ = head().coordinator.serving.resolve(name)
    return json_response(model_entry(model))


@openai.post("/v1/chat/completions")
async def chat() -> Response:
    return await generate(parse_chat(await request_json()))


@openai.post("/v1/completions")
async def completions() -> Response:
    return await generate(parse_completion(await request_json()))


async def generate(req: GenerationRequest) -> Response:
    serving = head().coordinator.serving
    cleanup = AsyncExitStack()
    async with cleanup:
        generation = await cleanup.enter_async_context(
            serving.open_generation(req.model, req.prompt, req.options)
        )
        reply = Reply(
            chat=req.chat,
            id=f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=generation.model,
            prompt_tokens=generation.prompt_tokens,
            include_usage=req.include_usage,
            logprobs=req.options.logprobs,
            echo=generation.echo,
        )
        # The first token before any byte is sent: an early failure gets its status.
        first = await generation.events.__anext__()
        if req.stream:
            body = generation_events(reply, first, generation.events)
            return sse_response(StreamBody(body, cleanup.pop_all()))
        got = [first]
        if first.finish_reason is None:
            got.extend([e async for e in generation.events])
    return json_response(reply.whole(got))
