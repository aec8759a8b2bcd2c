"""The head's coordinator: the peers discovery found, the topology, the loaded model,
admission of requests, and the figures the API and the console show.

One ``Coordinator`` per head process (``open_coordinator``); the HTTP API calls it,
it calls the ring. Prepare, load and unload run one at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import cattrs
import trio

from dnet.discovery import PeerFound, PeerLost
from dnet.errors import (
    ContextOverflow,
    DnetError,
    InvalidRequest,
    ModelNotFound,
    ModelNotLoaded,
    OverCapacity,
    PeerUnavailable,
)
from dnet.head.membership import follow_discovery, serve_health_checks
from dnet.head.ring import GenerationEvent, Ring, open_ring
from dnet.head.topology import Topology, load_topology, prepare_topology, topology_json
from dnet.identity import Identity
from dnet.protocol.messages import Status
from dnet.sampling import SamplingParams
from dnet.solver.profiles import HEAD

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0
RATE_WINDOW_S = 10.0


@attrs.frozen
class HeadStatistics:
    """A snapshot for dashboards: requests in flight, tokens over the last
    ``RATE_WINDOW_S``, and time to first token of the latest request."""

    state: str
    model: str | None
    active_requests: int
    max_concurrent: int
    requests_served: int
    tokens_generated: int
    tokens_per_s: float
    last_ttft_s: float | None
    load_progress: dict[str, tuple[int, int]]
    pending_model: str | None = None  # being prepared or loaded
    decode_lanes: tuple[int, ...] = ()  # running requests in each decode lane


@attrs.frozen
class LoadedModel:
    id: str  # what the client named (short name, repo id or path)
    path: str
    architecture: str
    dtype: str  # as computed (or GGUF's file type, e.g. Q4_1)
    quantization: dict[str, Any] | None
    num_layers: int
    context: int
    created: int
    format: str = "safetensors"  # or "gguf"

    def names(self) -> set[str]:
        """Every name a request may call this model by."""
        from dnet.runtime.packaged import packaged_name

        path = Path(self.path)
        short = packaged_name(path)
        return {self.id, self.path, path.name} | ({short} if short else set())


_TOPOLOGY_CONVERTER = cattrs.Converter()


def topology_from_json(data: Any) -> Topology:
    """A topology as ``topology_json`` wrote it (what ``prepare_topology`` returned).

    Raises:
        InvalidRequest
    """
    try:
        return _TOPOLOGY_CONVERTER.structure(data, Topology)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        raise InvalidRequest(f"not a topology from prepare_topology: {exc}", "topology") from None


class Coordinator:
    def __init__(
        self,
        ring: Ring,
        *,
        max_concurrent: int = 64,
        context: int = 4096,
        objective: str = "latency",
        compute_dtype: str | None = None,
    ) -> None:
        self.ring = ring
        self.compute_dtype = compute_dtype
        self.max_concurrent = max_concurrent
        self.context = context
        self.objective = objective
        self.topology: Topology | None = None
        self.model: LoadedModel | None = None
        self.state = "idle"
        self.load_progress: dict[str, tuple[int, int]] = {}
        self.pending_model: str | None = None
        self._operation = trio.Lock()
        self._active = 0
        self._served = 0
        self._tokens = 0
        self._recent: deque[float] = deque()
        self._last_ttft: float | None = None
        self.changed = trio.Event()  # set (and replaced) whenever the state moves

    def _touch(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # -- cluster ---------------------------------------------------------------------

    async def devices(self) -> list[dict[str, Any]]:
        """Every connected peer: identity, address, live status, measured profile,
        link round trip from the head, and the layers it holds."""
        peers = list(self.ring.peers)
        statuses: dict[str, Status | str] = {}

        async def one(peer: Any) -> None:
            try:
                with trio.fail_after(STATUS_TIMEOUT_S):
                    statuses[peer.peer_id] = await peer.call_status()
            except (DnetError, trio.TooSlowError) as exc:
                statuses[peer.peer_id] = getattr(exc, "message", "no answer to status")

        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(one, p)
        profiles = {d.peer_id: d for d in self.topology.devices} if self.topology else {}
        out = []
        for p in peers:
            status = statuses.get(p.peer_id)
            link = self.ring.link_cache.get((HEAD, p.peer_id))
            out.append(
                {
                    "peer_id": p.peer_id,
                    "name": p.name,
                    "address": p.address,
                    "healthy": isinstance(status, Status),
                    "error": status if isinstance(status, str) else None,
                    "status": attrs.asdict(status) if isinstance(status, Status) else None,
                    "profile": attrs.asdict(profiles[p.peer_id]) if p.peer_id in profiles else None,
                    "rtt_ms": link[1].latency_s * 2e3 if link else None,
                    "in_ring": p in self.ring.order,
                }
            )
        return out

    async def prepare(
        self,
        model: str,
        *,
        context: int | None = None,
        objective: str | None = None,
        compute_dtype: str | None = None,
    ) -> Topology:
        """Profile peers and links, and solve the placement of ``model``.

        Raises:
            NoFeasiblePlan, ModelNotFound, InvalidModel, PeerUnavailable
        """
        if not self.ring.peers:
            raise PeerUnavailable("no peers are connected: start dnet-peer on some machines")
        async with self._operation:
            previous, self.state, self.pending_model = self.state, "preparing", model
            self._touch()
            try:
                topology = await prepare_topology(
                    self.ring,
                    model,
                    context=context or self.context,
                    objective=objective or self.objective,
                    compute_dtype=compute_dtype or self.compute_dtype,
                )
            finally:
                self.state, self.pending_model = previous, None
                self._touch()
            self.topology = topology
            return topology

    async def load(self, model: str | None = None, topology: Topology | None = None) -> dict:
        """Load ``topology`` (or prepare ``model`` first) across its peers.

        Raises:
            InvalidRequest, NoFeasiblePlan, ModelNotFound, PeerUnavailable, PeerError
        """
        if topology is None:
            if model is None:
                raise InvalidRequest("give a model or a topology", "model")
            topology = await self.prepare(model)
        for a in topology.assignments:
            self.ring.peer(a.peer_id)  # PeerUnavailable if it left since prepare
        async with self._operation:
            self.state, self.model = "loading", None
            self.pending_model = model or topology.model
            self.load_progress = {a.peer_id: (0, 0) for a in topology.assignments}
            self._touch()

            def progress(peer_id: str, done: int, total: int) -> None:
                self.load_progress[peer_id] = (done, total)
                self._touch()

            started = time.monotonic()
            try:
                loaded = await load_topology(self.ring, topology, progress)
            except BaseException:
                self.state, self.pending_model = "idle", None
                self._touch()
                raise
            from dnet.runtime.model_dir import open_model_dir

            info = await trio.to_thread.run_sync(open_model_dir, topology.model)
            self.topology = topology
            dtype = topology.compute_dtype or str(info.config.get("torch_dtype", "float32"))
            if info.is_gguf:  # its file type says more: Q4_1 (its scales widened: + float32)
                widened = f" + {topology.compute_dtype}" if topology.compute_dtype else ""
                dtype = f"{info.config['gguf_file_type']}{widened}"
            self.model = LoadedModel(
                id=model or topology.name or topology.model,
                path=str(info.path),
                architecture=info.model_type,
                dtype=dtype,
                quantization=info.config.get("quantization"),
                num_layers=info.num_layers,
                context=topology.context,
                created=int(time.time()),
                format=info.format,
            )
            self.state, self.pending_model = "loaded", None
            self._touch()
            log.info("loaded %s across %d peers", self.model.id, len(loaded))
            return {
                "model": self.model.id,
                "load_seconds": time.monotonic() - started,
                "peers": [
                    {
                        "peer_id": a.peer_id,
                        "name": a.name,
                        "layers": [r.start, r.end],
                        "weight_bytes": r.weight_bytes,
                        "load_seconds": r.load_seconds,
                    }
                    for a, r in zip(topology.assignments, loaded, strict=True)
                ],
                "topology": topology_json(topology),
            }

    async def unload(self) -> None:
        async with self._operation:
            await self.ring.unload()
            self.model, self.state, self.load_progress = None, "idle", {}
            self._touch()

    # -- requests --------------------------------------------------------------------

    def resolve_model(self, name: str | None) -> LoadedModel:
        """The loaded model, if ``name`` names it (its id, path or directory name).

        Raises:
            ModelNotLoaded, ModelNotFound
        """
        model = self.model
        if model is None or not self.ring.order:
            raise ModelNotLoaded("no model is loaded: POST /v1/load_model first")
        if name is not None and name not in model.names():
            raise ModelNotFound(f"The model `{name}` does not exist; loaded is `{model.id}`")
        return model

    @property
    def tokenizer(self) -> Any:
        if self.ring.tokenizer is None:
            raise ModelNotLoaded("no model is loaded")
        return self.ring.tokenizer

    def token_limit(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """How many tokens a request may generate within the loaded context.

        Raises:
            ContextOverflow
        """
        assert self.model is not None
        room = self.model.context - prompt_tokens
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            asked = f" + {max_tokens} new tokens" if max_tokens is not None else ""
            raise ContextOverflow(
                f"this model's context is {self.model.context} tokens; the request needs "
                f"{prompt_tokens} prompt tokens{asked}"
            )
        return room if max_tokens is None else max_tokens

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Hold one of ``max_concurrent`` request slots.

        Raises:
            OverCapacity
        """
        if self._active >= self.max_concurrent:
            raise OverCapacity(
                f"{self._active} requests are running, the most this head admits "
                f"(--max-concurrent {self.max_concurrent}); try again shortly"
            )
        self._active += 1
        self._touch()
        try:
            yield
        finally:
            self._active -= 1
            self._served += 1
            self._touch()

    async def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        *,
        max_tokens: int,
        stop: Sequence[str] = (),
    ) -> AsyncGenerator[GenerationEvent, None]:
        """The ring's generation, counted in the statistics. Use inside
        ``contextlib.aclosing``."""
        started = time.monotonic()
        first = True
        async with aclosing(
            self.ring.generate(prompt, params, max_tokens=max_tokens, stop=stop)
        ) as events:
            async for event in events:
                now = time.monotonic()
                if first:
                    self._last_ttft, first = now - started, False
                self._tokens += 1
                self._recent.append(now)
                yield event

    def statistics(self) -> HeadStatistics:
        now = time.monotonic()
        while self._recent and self._recent[0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        state = self.state
        if state == "loaded" and any(not p.alive for p in self.ring.order):
            state = "degraded"  # a peer of the ring is gone: requests fail until a reload
        return HeadStatistics(
            state=state,
            model=self.model.id if self.model else None,
            active_requests=self._active,
            max_concurrent=self.max_concurrent,
            requests_served=self._served,
            tokens_generated=self._tokens,
            tokens_per_s=len(self._recent) / RATE_WINDOW_S,
            last_ttft_s=self._last_ttft,
            load_progress=dict(self.load_progress),
            pending_model=self.pending_model,
            decode_lanes=tuple(self.ring.lanes.sizes()),
        )


@asynccontextmanager
async def open_coordinator(
    identity: Identity,
    cluster_key: bytes,
    *,
    static_peers: Sequence[str] = (),
    mdns_interfaces: Sequence[str] = (),
    max_concurrent: int = 64,
    context: int = 4096,
    compute_dtype: str | None = None,
    decode_lanes: int | None = None,
    health_interval_s: float = 5.0,
    redial_interval_s: float = 10.0,
) -> AsyncIterator[Coordinator]:
    """A coordinator whose ring follows discovery: the static addresses (dialled
    again every ``redial_interval_s`` while down) and, when ``mdns_interfaces`` are
    given, peers advertised over mDNS on them."""
    from dnet.discovery.static import announce_static, redial_static

    async with (
        open_ring([], identity, cluster_key, decode_lanes=decode_lanes) as ring,
        trio.open_nursery() as nursery,
    ):
        coordinator = Coordinator(
            ring, max_concurrent=max_concurrent, context=context, compute_dtype=compute_dtype
        )
        send, receive = trio.open_memory_channel[PeerFound | PeerLost](math.inf)
        nursery.start_soon(follow_discovery, ring, receive)
        if mdns_interfaces:
            from dnet.discovery.mdns import browse

            await nursery.start(browse, list(mdns_interfaces), send.clone())
        await announce_static(static_peers, send)
        if static_peers:
            nursery.start_soon(redial_static, list(static_peers), send, redial_interval_s)
        nursery.start_soon(serve_health_checks, ring, health_interval_s)
        try:
            yield coordinator
        finally:
            nursery.cancel_scope.cancel()


async def wait_for_peers(coordinator: Coordinator, count: int, timeout_s: float) -> int:
    """Wait until ``count`` peers are connected, or ``timeout_s``; the number connected."""
    with trio.move_on_after(timeout_s):
        await coordinator.ring.wait_peers(count)
    return len(coordinator.ring.peers)
