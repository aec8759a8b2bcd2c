"""The cluster endpoints: health, devices, topology, loading, status (also as a
stream) and the head's log lines."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import attrs
import trio
from quart import Blueprint, Response, request

from dnet.api.context import head, request_json
from dnet.api.errors import json_response, refusal
from dnet.api.responses import sse
from dnet.api.streaming import sse_response
from dnet.errors import InvalidRequest
from dnet.head.coordinator import Coordinator
from dnet.head.results import topology_from_json
from dnet.head.topology import topology_json

STATUS_HEARTBEAT_S = 1.0
STATUS_MIN_INTERVAL_S = 0.05
OBJECTIVES = (None, "latency", "throughput")
COMPUTE_DTYPES = (None, "float32", "float16", "bfloat16")

cluster = Blueprint("cluster", __name__)


@cluster.get("/health")
async def health() -> Response:
    coordinator = head().coordinator
    stats = coordinator.statistics()
    return json_response(
        {
            "status": "ok",
            "state": stats.state,
            "model": stats.model,
            "peers": len(coordinator.cluster.peers),
        }
    )


@cluster.get("/v1/devices")
async def devices() -> Response:
    found = await head().coordinator.devices()
    return json_response({"object": "list", "data": [attrs.asdict(d) for d in found]})


def _prepare_options(data: dict[str, Any]) -> dict[str, Any]:
    """Raises:
    InvalidRequest
    """
    context = data.get("context", data.get("max_context"))
    if context is not None and (
        not isinstance(context, int) or isinstance(context, bool) or context < 1
    ):
        raise InvalidRequest("'context' must be a positive integer", "context")
    if data.get("objective") not in OBJECTIVES:
        raise InvalidRequest("'objective' must be latency or throughput", "objective")
    if data.get("compute_dtype") not in COMPUTE_DTYPES:
        raise InvalidRequest(
            "'compute_dtype' must be float32, float16 or bfloat16", "compute_dtype"
        )
    return {
        "context": context,
        "objective": data.get("objective"),
        "compute_dtype": data.get("compute_dtype"),
    }


@cluster.post("/v1/prepare_topology")
async def prepare() -> Response:
    data = await request_json()
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "'model' must name a model: a directory, a .gguf file, a repo id or smollm2-135m",
            "model",
        )
    topology = await head().coordinator.prepare(model, **_prepare_options(data))
    return json_response(topology_json(topology))


@cluster.get("/v1/topology")
async def topology() -> Response:
    current = head().coordinator.topology
    if current is None:
        return refusal("no topology yet: POST /v1/prepare_topology", "no_topology", 404)
    return json_response(topology_json(current))


@cluster.post("/v1/load_model")
async def load_model() -> Response:
    data = await request_json()
    coordinator = head().coordinator
    if "assignments" in data:
        result = await coordinator.load(topology=topology_from_json(data))
    elif isinstance(data.get("topology"), dict):
        model = data.get("model")
        result = await coordinator.load(
            model=model if isinstance(model, str) and model else None,
            topology=topology_from_json(data["topology"]),
        )
    else:
        model = data.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("give 'model', or a topology from prepare_topology", "model")
        result = await coordinator.load(model=model)
    return json_response(attrs.asdict(result))


@cluster.post("/v1/unload_model")
async def unload_model() -> Response:
    await head().coordinator.unload()
    return json_response({"status": "unloaded"})


def status_body(coordinator: Coordinator) -> dict[str, Any]:
    stats = attrs.asdict(coordinator.statistics())
    return {
        "head": stats,
        "model": attrs.asdict(coordinator.model) if coordinator.model else None,
        "topology": topology_json(coordinator.topology) if coordinator.topology else None,
    }


@cluster.get("/v1/status")
async def status() -> Response:
    return json_response(status_body(head().coordinator))


@cluster.get("/v1/status/stream")
async def status_stream() -> Response:
    """The status as server-sent events: at once, on every change (state, load
    progress, requests; progress at most every ``STATUS_MIN_INTERVAL_S``, so a
    brief state is not skipped), and at least every ``STATUS_HEARTBEAT_S``. (The body runs
    outside the request's context: it holds the coordinator itself.)"""
    coordinator = head().coordinator

    async def events() -> AsyncGenerator[bytes, None]:
        shown = None
        while True:
            changed = coordinator.changed
            body = status_body(coordinator)
            yield sse(body)
            state, shown = shown, body["head"]["state"]
            if state == shown:  # a burst of progress: one event; a new state at once
                await trio.sleep(STATUS_MIN_INTERVAL_S)
            with trio.move_on_after(STATUS_HEARTBEAT_S):
                await changed.wait()  # already set if something changed meanwhile

    return sse_response(events())


@cluster.get("/v1/logs")
async def log_lines() -> Response:
    try:
        after = int(request.args.get("after", "0"))
    except ValueError:
        raise InvalidRequest("'after' must be an integer", "after") from None
    logs = head().logs
    next_seq, lines = logs.after(after) if logs is not None else (0, [])
    return json_response({"next": next_seq, "lines": lines})
