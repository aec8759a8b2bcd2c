"""``PeerDaemon``: holds one slice, runs activations in arrival order on the compute
thread, forwards results to its successor and tokens to its controller (the head
connection that loaded it).

Tasks, all in one nursery: the listener (one handler task per connection), the
worker (request work in ``WorkQueue`` order: decode steps, batched, take turns with
prefill chunks and run between a chunk's layers), the sender (the FIFO of outgoing messages), the
successor link, and the idle-request reaper.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import trio

from dnet.errors import (
    DnetError,
    LayerRangeError,
    LoadCancelled,
    PeerUnavailable,
)
from dnet.identity import Identity, verify_signature
from dnet.models.model_dir import ModelDir, open_model_dir
from dnet.models.model_profile import check_budget
from dnet.peer.disk import make_room, touch
from dnet.peer.measuring import PeerMeasurements
from dnet.peer.outbox import Outbox
from dnet.peer.request_work import PREFILL_SLICE_S, RATE_WINDOW_S, RequestMeta, RequestWork
from dnet.peer.sources import SpanFetches, hub_source
from dnet.peer.weights import WeightStore
from dnet.peer.work import WorkQueue
from dnet.protocol.codec import ProtocolError
from dnet.protocol.messages import (
    Activation,
    Cancel,
    EndRequest,
    Error,
    FetchProgress,
    Follow,
    Loaded,
    LoadProgress,
    LoadSlice,
    Message,
    Ping,
    Pong,
    ProbeLink,
    ProfileRequest,
    SpanData,
    StartRequest,
    Status,
    StatusRequest,
    Step,
    Unload,
    Unloaded,
)
from dnet.runtime.compute import ComputeThread
from dnet.runtime.device_profile import release_memory
from dnet.runtime.engine import SliceEngine
from dnet.runtime.slice import load_slice
from dnet.transport.connection import Connection, open_connection, serve_connections
from dnet.transport.links import LinkClosed

log = logging.getLogger(__name__)

FOLLOW_TIMEOUT_S = 120.0  # the next peer may still be reading its weights
REQUEST_WORK = (StartRequest, Activation, Step, EndRequest, Cancel)


class PeerDaemon(RequestWork):
    """One peer. Use ``run`` inside a nursery; it reports its port when listening."""

    def __init__(
        self,
        identity: Identity,
        cluster_key: bytes,
        compute: ComputeThread,
        *,
        name: str = "",
        request_idle_timeout_s: float = 600.0,
        state_dir: Path | None = None,
        max_memory: int | None = None,
        weights_dir: Path | None = None,
        local_dirs: Sequence[Path] = (),
        hf_cache: Path | None = None,
        max_disk: int | None = None,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.name = name
        self._cluster_key = cluster_key
        self._compute = compute
        self._idle_timeout = request_idle_timeout_s
        self.max_memory = max_memory  # bytes offered for weights and KV (--max-memory)
        self.measurements = PeerMeasurements(
            identity, cluster_key, compute, name=name, state_dir=state_dir, max_memory=max_memory
        )
        self.engine: SliceEngine | None = None
        self.loaded: LoadSlice | None = None
        self.controller: Connection | None = None
        self._followers: dict[str, Connection] = {}
        self._followed = trio.Event()
        self._predecessor_scope: trio.CancelScope | None = None
        self._meta: dict[str, RequestMeta] = {}
        self._recent: deque[tuple[float, int]] = deque()
        self._step_s = 0.0  # moving average of a decode step's compute time
        self._step_rows = 0.0  # moving average of the requests in a decode step
        self.step_sizes: Counter[int] = Counter()  # decode steps run, by rows
        self._queue = WorkQueue()
        self.prefill_slice_s = PREFILL_SLICE_S
        self._held: list[tuple[Activation, bytes]] = []  # prefill outputs behind a step
        self._outbox = Outbox(
            self.peer_id,
            lambda: self._successor,
            lambda: self.controller,
            lambda: self.loaded.next_peer_id if self.loaded else None,
        )
        self._load_lock = trio.Lock()
        self._loading: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        # Weights by content, from local copies, the hub, or the head that loads a
        # slice; without a directory, a temporary one for the daemon's life.
        self._weights_dir = weights_dir
        self.weights = WeightStore(weights_dir or Path("."), local_dirs, hf_cache)
        self.max_disk = max_disk
        self._fetches = SpanFetches()

    # -- running -----------------------------------------------------------------

    async def run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with tempfile.TemporaryDirectory(prefix="dnet-weights-") as scratch:
            if self._weights_dir is None:
                self.weights.root = Path(scratch)
            await self._run(host, port, task_status)

    async def _run(self, host: str, port: int, task_status: trio.TaskStatus[int]) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._worker)
            nursery.start_soon(self._outbox.serve)
            nursery.start_soon(self._reaper)
            bound = await nursery.start(
                partial(serve_connections, name=self.name),
                self._serve,
                host,
                port,
                self.identity,
                self._cluster_key,
                verify_signature,
            )
            task_status.started(bound)

    async def _serve(self, conn: Connection) -> None:
        log.info("connection from %s (%s)", conn.remote_name, conn.remote_peer_id[:12])
        try:
            while True:
                try:
                    message, payload = await conn.receive()
                except LinkClosed:
                    return
                except ProtocolError as exc:
                    log.warning("closing %r: %s", conn, exc)
                    await conn.fail(exc)
                    return
                if isinstance(message, REQUEST_WORK):
                    self._queue.put(message, payload)
                    continue
                if isinstance(message, Ping):
                    try:
                        await conn.send(Pong(message.seq, time.monotonic_ns()), payload)
                    except LinkClosed:
                        return
                    continue
                if isinstance(message, SpanData):
                    await self._fetches.deliver(conn, message, payload)
                    continue
                if isinstance(message, LoadSlice) and self._nursery is not None:
                    # Loading fetches weights over this connection: keep reading it.
                    self._nursery.start_soon(self._answer, conn, message)
                    continue
                try:
                    reply = await self._control(conn, message)
                except DnetError as exc:  # a bad request: say why, keep the connection
                    reply = Error(exc.code, exc.message, peer_id=self.peer_id)
                if reply is None:
                    continue
                try:
                    await conn.send(reply)
                except LinkClosed:
                    return
        finally:
            self._fetches.close(conn)  # a fetch hears at once that its head is gone
            if self.controller is conn:
                self.controller = None
                if self._nursery is not None:  # its requests have no one to answer to
                    self._nursery.start_soon(self._free_orphans, conn)
            if self._followers.get(conn.remote_peer_id) is conn:
                del self._followers[conn.remote_peer_id]

    async def _answer(self, conn: Connection, message: Message) -> None:
        try:
            reply = await self._control(conn, message)
        except DnetError as exc:
            reply = Error(exc.code, exc.message, peer_id=self.peer_id)
        if reply is not None:
            with suppress(LinkClosed):
                await conn.send(reply)

    async def _free_orphans(self, conn: Connection) -> None:
        """Free every request: the head that started them is gone (killed, or its
        link dropped); it fails them on its side, and nobody reads their tokens."""
        engine = self.engine
        if engine is None:
            return
        try:
            rids = await self._compute.run(engine.request_ids)
            if self.controller is not None:
                return  # a head took over at once: its requests are not orphans
            for rid in rids:
                self._meta.pop(rid, None)
                await self._compute.run(engine.end, rid)
        except trio.ClosedResourceError:
            return  # the peer is stopping: everything goes anyway
        if rids:
            log.info("freed %d requests of %s, which disconnected", len(rids), conn)

    async def _control(self, conn: Connection, message: Message) -> Message | None:
        if isinstance(message, StatusRequest):
            return self.status()
        if isinstance(message, ProfileRequest):
            return await self.measurements.profile(message.dtype, message.hidden)
        if isinstance(message, ProbeLink):
            return await self.measurements.probe(message)
        if isinstance(message, LoadSlice):
            self.controller = conn
            return await self._load(message)
        if isinstance(message, Unload):
            if self._loading is not None:  # a load under way stops first
                self._loading.cancel()
            async with self._load_lock:
                await self._unload()
            return Unloaded()
        if isinstance(message, Follow):
            # Any authenticated peer may ask; only the plan's next peer is used.
            self._followers[conn.remote_peer_id] = conn
            self._followed.set()
            self._followed = trio.Event()
            return None
        raise ProtocolError(f"a peer does not accept {type(message).__name__}")

    @property
    def _successor(self) -> Connection | None:
        loaded = self.loaded
        if loaded is None or loaded.next_peer_id is None:
            return None
        conn = self._followers.get(loaded.next_peer_id)
        return conn if conn is not None and not conn.closed else None

    # -- loading ---------------------------------------------------------------

    async def _load(self, msg: LoadSlice) -> Loaded:
        """Raises:
        LoadCancelled (an Unload came first), and what loading raises
        """
        async with self._load_lock:
            with trio.CancelScope() as self._loading:
                try:
                    return await self._load_locked(msg)
                finally:
                    self._loading = None
            await self._unload()
            raise LoadCancelled(f"the load of layers [{msg.start}, {msg.end}) was called off")

    async def _load_locked(self, msg: LoadSlice) -> Loaded:
        await self._unload()
        started = time.perf_counter()
        if not msg.is_first and not (msg.prev_address and msg.prev_peer_id):
            raise LayerRangeError("a slice that is not first needs its previous peer")
        if not msg.is_last and not msg.next_peer_id:
            raise LayerRangeError("a slice that is not last needs its next peer")
        token = trio.lowlevel.current_trio_token()
        controller = self.controller

        def progress(done: int, total: int) -> None:
            # On the compute thread: queue the message for the sender task.
            if controller is not None:
                token.run_sync_soon(self._to_controller, LoadProgress(msg.model, done, total))

        fetched = self.weights.fetched_bytes
        model = await self._fetch_weights(msg, controller)
        fetched = self.weights.fetched_bytes - fetched
        layer_slice = await self._compute.run(
            load_slice, model, msg.start, msg.end, progress, msg.compute_dtype
        )
        if layer_slice.is_first != msg.is_first or layer_slice.is_last != msg.is_last:
            raise LayerRangeError(
                f"layers [{msg.start}, {msg.end}) of {layer_slice.model.num_layers}: "
                f"first={layer_slice.is_first} last={layer_slice.is_last}, the plan says "
                f"first={msg.is_first} last={msg.is_last}"
            )
        if not msg.is_first:
            assert msg.prev_address and msg.prev_peer_id
            await self._follow(msg.prev_address, msg.prev_peer_id)
        self.engine = SliceEngine(layer_slice, max_context=msg.max_context)
        self._step_s = self._step_rows = 0.0
        self.loaded = msg
        if not msg.is_last:
            await self._wait_for_follower(msg.next_peer_id or "")
        seconds = time.perf_counter() - started
        log.info("loaded %s layers [%d, %d) in %.2fs", msg.model, msg.start, msg.end, seconds)
        return Loaded(msg.model, msg.start, msg.end, layer_slice.weight_bytes, seconds, fetched)

    async def _fetch_weights(self, msg: LoadSlice, controller: Connection | None) -> ModelDir:
        """The slice's files, verified in the store: headers first (to check the
        budget before a tensor's byte comes), then its tensors, from a local copy,
        the hub, or the head, in that order; progress goes to the head."""
        sources = [self._fetches.source(controller, msg.model_id)]
        if msg.hub is not None:
            sources.insert(0, hub_source(msg.hub))

        def progress(source: str, done: int, total: int, rate: float) -> None:
            if controller is not None:
                self._to_controller(FetchProgress(msg.model_id, source, done, total, rate))

        ensure = partial(self.weights.ensure, msg.model_id, msg.files, sources, hub=msg.hub)
        directory = await ensure(headers_only=True)
        model = await trio.to_thread.run_sync(open_model_dir, directory)
        self._check_budget(model, msg)
        if self.max_disk is not None:
            await trio.to_thread.run_sync(self._make_disk_room, msg)
        else:
            await trio.to_thread.run_sync(touch, self.weights.root, msg.model_id)
        await ensure(progress=progress)
        return model

    def _make_disk_room(self, msg: LoadSlice) -> None:
        """Evict models not loaded, least recently used first, until this slice fits
        in ``--max-disk``.

        Raises:
            OverDiskBudget
        """
        assert self.max_disk is not None
        need = sum(s.end - s.begin for f in msg.files for s in f.spans)
        evicted = make_room(self.weights.root, msg.model_id, need, self.max_disk)
        if evicted:
            log.info("evicted %s to keep --max-disk", ", ".join(evicted))

    def _check_budget(self, model: ModelDir, msg: LoadSlice) -> None:
        """Refuse a slice over this peer's budget before fetching or reading a byte
        of its tensors.

        Raises:
            OverMemoryBudget
        """
        if self.max_memory:
            context = msg.max_context or int(model.config.get("max_position_embeddings") or 4096)
            check_budget(model, msg.start, msg.end, msg.compute_dtype, context, self.max_memory)

    async def _wait_for_follower(self, peer_id: str) -> None:
        with trio.move_on_after(FOLLOW_TIMEOUT_S):
            while self._successor is None:
                await self._followed.wait()
        if self._successor is None:
            raise PeerUnavailable(
                f"the next peer {peer_id[:12]} did not connect within {FOLLOW_TIMEOUT_S:.0f}s"
            )

    async def _unload(self) -> None:
        if self._predecessor_scope is not None:
            self._predecessor_scope.cancel()
            self._predecessor_scope = None
        engine, self.engine, self.loaded = self.engine, None, None
        self._meta.clear()
        self._held.clear()
        if engine is not None:
            # Drop the arrays on the thread that owns them.
            await self._compute.run(engine.expire_idle, -1.0)
            del engine
            await self._compute.run(release_memory)

    async def _follow(self, address: str, peer_id: str) -> None:
        """Dial the previous peer, ask for its outputs, and serve what it sends."""
        assert self._nursery is not None
        ready = trio.Event()
        failure: list[BaseException] = []

        async def hold() -> None:
            with trio.CancelScope() as scope:
                self._predecessor_scope = scope
                try:
                    async with open_connection(
                        address,
                        self.identity,
                        self._cluster_key,
                        verify_signature,
                        expected_peer_id=peer_id,
                        name=self.name,
                    ) as conn:
                        await conn.send(Follow())
                        ready.set()
                        await self._serve(conn)
                except (DnetError, ProtocolError) as exc:
                    failure.append(exc)
                finally:
                    ready.set()

        self._nursery.start_soon(hold)
        await ready.wait()
        if failure:
            raise PeerUnavailable(f"cannot reach the previous peer {address}: {failure[0]}")

    async def _reaper(self) -> None:
        period = max(1.0, min(60.0, self._idle_timeout / 4))
        while True:
            await trio.sleep(period)
            engine = self.engine
            if engine is not None:
                for rid in await self._compute.run(engine.expire_idle, self._idle_timeout):
                    self._meta.pop(rid, None)
                    log.info("freed idle request %s", rid)

    # -- status -------------------------------------------------------------------

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._recent if now - t <= RATE_WINDOW_S]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1.0)

    def status(self) -> Status:
        mem = psutil.virtual_memory()
        engine, loaded = self.engine, self.loaded
        stats: Any = engine.statistics() if engine is not None else None
        return Status(
            peer_id=self.peer_id,
            name=self.name,
            memory_total=mem.total,
            memory_available=mem.available,
            model=loaded.model if loaded else None,
            layers=(loaded.start, loaded.end) if loaded else None,
            active_requests=stats.requests if stats else 0,
            tokens_processed=stats.tokens_processed if stats else 0,
            tokens_per_s=self.tokens_per_s(),
            kv_bytes=stats.kv_bytes if stats else 0,
            weight_bytes=stats.weight_bytes if stats else 0,
            decode_step_s=self._step_s,
            step_rows=self._step_rows,
            memory_budget=self.max_memory or 0,
        )
