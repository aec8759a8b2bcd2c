"""How a peer loads a slice: its weights verified in the store (fetched from a
local copy, the hub or the head, within ``--max-memory`` and ``--max-disk``), its
layers read on the compute thread, and its links (following the previous peer,
waiting for the next). An ``Unload`` calls a load under way off. Mixed into
``PeerDaemon``, which owns the state."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import TYPE_CHECKING

import trio

from dnet.errors import DnetError, LayerRangeError, LoadCancelled, PeerUnavailable
from dnet.identity import Identity, verify_signature
from dnet.models.model_dir import ModelDir, open_model_dir
from dnet.models.model_profile import check_budget
from dnet.peer.disk import make_room, touch
from dnet.peer.request_work import RequestMeta
from dnet.peer.sources import SpanFetches, hub_source, peer_source
from dnet.peer.weights import WeightStore
from dnet.protocol.codec import ProtocolError
from dnet.protocol.messages import (
    Activation,
    FetchProgress,
    Follow,
    Loaded,
    LoadProgress,
    LoadSlice,
    Message,
)
from dnet.runtime.compute import ComputeThread
from dnet.runtime.device_profile import large_blocks_reused, release_memory
from dnet.runtime.engine import SliceEngine
from dnet.runtime.slice import load_slice
from dnet.transport.connection import Connection, open_connection

log = logging.getLogger(__name__)

FOLLOW_TIMEOUT_S = 120.0  # the next peer may still be reading its weights
MAX_HOLDERS = 8  # other peers asked for spans, at most


class SliceLoading:
    """The loading half of a peer daemon."""

    identity: Identity
    name: str
    engine: SliceEngine | None
    loaded: LoadSlice | None
    controller: Connection | None
    weights: WeightStore
    max_memory: int | None
    max_disk: int | None
    _cluster_key: bytes
    _compute: ComputeThread
    _fetches: SpanFetches
    _load_lock: trio.Lock
    _loading: trio.CancelScope | None
    _unloads: int
    _followed: trio.Event
    _predecessor_scope: trio.CancelScope | None
    _nursery: trio.Nursery | None
    _meta: dict[str, RequestMeta]
    _held: list[tuple[Activation, bytes]]
    _step_s: float
    _step_rows: float

    if TYPE_CHECKING:  # the daemon's

        @property
        def _successor(self) -> Connection | None: ...

        def _to_controller(self, message: Message) -> None: ...

        async def _serve(self, conn: Connection) -> None: ...

    async def _load(self, msg: LoadSlice, unloads: int | None = None) -> Loaded:
        """Load ``msg``'s slice, unless an Unload came since it was read (``unloads``:
        how many had come then).

        Raises:
            LoadCancelled (an Unload came first), and what loading raises
        """
        async with self._load_lock:
            if unloads is not None and unloads != self._unloads:
                raise LoadCancelled(f"layers [{msg.start}, {msg.end}): an unload came first")
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

        fetched, fetch_started = self.weights.fetched_bytes, time.perf_counter()
        model = await self._fetch_weights(msg, controller)
        fetched = self.weights.fetched_bytes - fetched
        fetch_s = time.perf_counter() - fetch_started
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
        return Loaded(
            msg.model, msg.start, msg.end, layer_slice.weight_bytes, seconds, fetched, fetch_s
        )

    async def _fetch_weights(self, msg: LoadSlice, controller: Connection | None) -> ModelDir:
        """The slice's files, verified in the store: headers first (to check the
        budget before a tensor's byte comes), then its tensors, from a local copy,
        the hub, or the head, in that order; progress goes to the head."""
        sources = [hub_source(msg.hub)] if msg.hub is not None else []
        sources += [
            peer_source(h, msg.model_id, self.identity, self._cluster_key, self.name)
            for h in msg.holders[:MAX_HOLDERS]
            if h.peer_id != self.identity.peer_id
        ]
        sources.append(self._fetches.source(controller, msg.model_id))

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
        with large_blocks_reused():
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
