"""The head's coordinator: the cluster discovery keeps, the topology, the loaded
ring, and the figures the API and the console show.

The model's life is an explicit state machine (``ModelState``, moved only through
``_TRANSITIONS``, as h11 keeps its states); prepare, load and unload run one at a
time. Results are typed values; the API turns them into JSON.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Any

import attrs
import trio

from dnet.errors import DnetError, InvalidRequest, ModelNotLoaded, PeerUnavailable
from dnet.head.cluster import Cluster
from dnet.head.loaded_ring import LoadedRing
from dnet.head.loading import PeerLoading
from dnet.head.results import Device, LoadedModel, LoadResult, PeerLoad
from dnet.head.serving import HeadStatistics, Serving
from dnet.head.topology import Topology, load_topology, model_context, prepare_topology
from dnet.models.model_dir import ModelDir
from dnet.protocol.messages import Status
from dnet.solver.profiles import HEAD

log = logging.getLogger(__name__)

STATUS_TIMEOUT_S = 5.0


class ModelState(enum.Enum):
    IDLE = "idle"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


class Move(enum.Enum):
    LOAD = enum.auto()
    LOADED = enum.auto()
    FAILED = enum.auto()
    UNLOAD = enum.auto()
    UNLOADED = enum.auto()


_TRANSITIONS: dict[tuple[ModelState, Move], ModelState] = {
    (ModelState.IDLE, Move.LOAD): ModelState.LOADING,
    (ModelState.LOADED, Move.LOAD): ModelState.LOADING,  # a new model replaces it
    (ModelState.LOADING, Move.LOADED): ModelState.LOADED,
    (ModelState.LOADING, Move.FAILED): ModelState.IDLE,
    (ModelState.IDLE, Move.UNLOAD): ModelState.UNLOADING,
    (ModelState.LOADED, Move.UNLOAD): ModelState.UNLOADING,
    (ModelState.UNLOADING, Move.UNLOADED): ModelState.IDLE,
    (ModelState.UNLOADING, Move.FAILED): ModelState.IDLE,
}


class Coordinator:
    def __init__(
        self,
        cluster: Cluster,
        *,
        max_concurrent: int = 64,
        context: int = 4096,
        objective: str = "latency",
        compute_dtype: str | None = None,
    ) -> None:
        self.cluster = cluster
        self.context = context
        self.objective = objective
        self.compute_dtype = compute_dtype
        self.topology: Topology | None = None
        self.model: LoadedModel | None = None
        self.ring: LoadedRing | None = None
        self.state = ModelState.IDLE
        self.preparing: str | None = None  # the model being prepared
        self.pending_model: str | None = None  # being loaded
        self.load_progress: dict[str, PeerLoading] = {}
        self.serving = Serving(self, max_concurrent)
        # The topology the user loaded; while its peers are missing, a fallback
        # plan on the others runs instead (``dnet.head.recovery``).
        self.intended: Topology | None = None
        self.on_fallback = False
        self.replanning: str | None = None  # why, while a re-plan runs
        self._operation = trio.Lock()
        self.changed = trio.Event()  # set (and replaced) whenever the state moves

    def touch(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def _move(self, move: Move) -> None:
        self.state = _TRANSITIONS[(self.state, move)]  # a KeyError is a bug here
        self.touch()

    # -- cluster ---------------------------------------------------------------------

    async def devices(self) -> list[Device]:
        """Every connected peer: identity, address, live status, measured profile,
        link round trip from the head, and whether it holds a slice of the ring."""
        peers = list(self.cluster.peers)
        statuses: dict[str, Status | str] = {}

        async def one(peer: Any) -> None:
            try:
                statuses[peer.peer_id] = await peer.call_status(STATUS_TIMEOUT_S)
            except DnetError as exc:
                statuses[peer.peer_id] = exc.message

        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(one, p)
        profiles = {d.peer_id: d for d in self.topology.devices} if self.topology else {}
        order = self.ring.order if self.ring else []
        out = []
        for p in peers:
            status = statuses.get(p.peer_id, "no answer to status")
            link = self.cluster.link_cache.get((HEAD, p.peer_id))
            out.append(
                Device(
                    peer_id=p.peer_id,
                    name=p.name,
                    address=p.address,
                    healthy=isinstance(status, Status),
                    error=status if isinstance(status, str) else None,
                    status=status if isinstance(status, Status) else None,
                    profile=profiles.get(p.peer_id),
                    rtt_ms=link[1].latency_s * 2e3 if link else None,
                    in_ring=p in order,
                )
            )
        return out

    async def prepare(
        self,
        model: str | ModelDir,
        *,
        context: int | None = None,
        objective: str | None = None,
        compute_dtype: str | None = None,
    ) -> Topology:
        """Profile peers and links, and solve the placement of ``model``. The head's
        ``--context`` is cut to what the model was trained for; a ``context`` asked
        for beyond it is refused.

        Raises:
            NoFeasiblePlan, ModelNotFound, InvalidModel, PeerUnavailable,
            InvalidRequest
        """
        if not self.cluster.peers:
            raise PeerUnavailable("no peers are connected: start dnet-peer on some machines")
        named = model if isinstance(model, str) else None
        if not isinstance(model, ModelDir):
            model = await self.cluster.open_model(model)
        context = model_context(model, context, self.context)
        async with self._operation:
            self.preparing = str(model.path)
            self.touch()
            try:
                topology = await prepare_topology(
                    self.cluster,
                    model,
                    context=context,
                    objective=objective if objective is not None else self.objective,
                    compute_dtype=compute_dtype
                    if compute_dtype is not None
                    else self.compute_dtype,
                )
            finally:
                self.preparing = None
                self.touch()
            if named is not None:
                topology = attrs.evolve(topology, name=named)
            self.topology = topology
            return topology

    async def load(self, model: str | None = None, topology: Topology | None = None) -> LoadResult:
        """Load ``topology`` (or prepare ``model`` first) across its peers.

        Raises:
            InvalidRequest, NoFeasiblePlan, ModelNotFound, PeerUnavailable, PeerError
        """
        if model is None and topology is None:
            raise InvalidRequest("give a model or a topology", "model")
        name = topology.model if topology is not None else str(model)
        info = await self.cluster.open_model(name)
        if topology is None:
            topology = await self.prepare(info)
            topology = attrs.evolve(topology, name=model or topology.name)
        for a in topology.assignments:
            self.cluster.peer(a.peer_id)  # PeerUnavailable if it left since prepare
        async with self._operation:
            result = await self._load(model or topology.name or topology.model, info, topology)
            self.intended, self.on_fallback = topology, False
            return result

    async def _load(self, model_id: str, info: ModelDir, topology: Topology) -> LoadResult:
        self.model, self.ring, self.pending_model = None, None, model_id
        self.load_progress = {a.peer_id: PeerLoading("waiting", 0, 0) for a in topology.assignments}
        self._move(Move.LOAD)

        def progress(peer_id: str, step: PeerLoading) -> None:
            self.load_progress[peer_id] = step
            self.touch()

        started = time.monotonic()
        try:
            ring = await load_topology(self.cluster, topology, progress, info)
        except BaseException:
            self.pending_model = None
            self._move(Move.FAILED)
            raise
        self.topology, self.ring, self.pending_model = topology, ring, None
        self.model = LoadedModel.describe(model_id, info, topology)
        self._move(Move.LOADED)
        log.info("loaded %s across %d peers", model_id, len(ring.order))
        return LoadResult(
            model=model_id,
            load_seconds=time.monotonic() - started,
            peers=tuple(
                PeerLoad(a.peer_id, a.name, (r.start, r.end), r.weight_bytes, r.load_seconds)
                for a, r in zip(topology.assignments, ring.loaded, strict=True)
            ),
            topology=topology,
        )

    async def replan(self, why: str, topology: Topology, *, fallback: bool) -> LoadResult:
        """Load ``topology`` in place of the running one, keeping the model's name;
        ``fallback``: a stand-in while the intended topology's peers are missing.

        Raises:
            as ``load``
        """
        model = self.model
        if model is None:
            raise ModelNotLoaded("nothing to re-plan: no model is loaded")
        log.warning("re-planning %s: %s", model.id, why)
        async with self._operation:
            self.set_replan(why)
            try:
                info = await self.cluster.open_model(model.path)
                result = await self._load(model.id, info, topology)
            finally:
                self.set_replan(None)
            self.on_fallback = fallback
            if not fallback:
                self.intended = topology
            peers = ", ".join(f"{p.name} {p.layers[0]}-{p.layers[1]}" for p in result.peers)
            log.warning("re-planned %s in %.1f s: %s", model.id, result.load_seconds, peers)
            return result

    def set_replan(self, why: str | None) -> None:
        self.replanning = why
        self.touch()

    def model_name(self) -> str:
        return self.model.id if self.model else "the model"

    def model_path(self) -> str:
        """Raises:
        ModelNotLoaded
        """
        if self.model is None:
            raise ModelNotLoaded("no model is loaded")
        return self.model.path

    async def unload(self) -> None:
        async with self._operation:
            self.intended, self.on_fallback = None, False
            ring, self.ring, self.model = self.ring, None, None
            self._move(Move.UNLOAD)
            try:
                if ring is not None:
                    await ring.unload()
            finally:
                self.load_progress = {}
                self._move(Move.UNLOADED)

    # -- figures ---------------------------------------------------------------------

    def state_name(self) -> str:
        """The state as dashboards show it: ``preparing`` while a prepare runs, and
        ``degraded`` while a peer of the loaded ring is gone."""
        if self.preparing is not None:
            return "preparing"
        if self.state is ModelState.LOADED and self.ring is not None and not self.ring.healthy:
            return "degraded"  # requests fail until a reload
        return self.state.value

    def statistics(self) -> HeadStatistics:
        return self.serving.statistics()
