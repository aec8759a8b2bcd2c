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
)
from dnet.identity import Identity, verify_signature
from dnet.peer.measuring import PeerMeasurements
from dnet.peer.outbox import Outbox
from dnet.peer.request_work import PREFILL_SLICE_S, RATE_WINDOW_S, RequestMeta, RequestWork
from dnet.peer.slice_loading import SliceLoading
from dnet.peer.sources import SpanFetches, serve_span
from dnet.peer.weights import WeightStore
from dnet.peer.work import WorkQueue
from dnet.protocol.codec import ProtocolError
from dnet.protocol.messages import (
    Activation,
    Cancel,
    EndRequest,
    Error,
    FetchSpan,
    Follow,
    Have,
    HaveRequest,
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
from dnet.runtime.engine import SliceEngine
from dnet.transport.connection import Connection, serve_connections
from dnet.transport.links import LinkClosed

log = logging.getLogger(__name__)

REQUEST_WORK = (StartRequest, Activation, Step, EndRequest, Cancel)


class PeerDaemon(RequestWork, SliceLoading):
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
        self._unloads = 0  # Unloads received, to call off loads asked for before
        self._loads_in_flight = 0  # LoadSlice tasks not yet answered
        self._loads_answered = trio.Event()
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
                if isinstance(message, FetchSpan):  # another peer fetching from this one
                    await serve_span(self.weights, conn, message)
                    continue
                if isinstance(message, LoadSlice) and self._nursery is not None:
                    # Loading fetches weights over this connection: keep reading it.
                    # (An Unload read after it, before its task starts, calls it off;
                    # it is answered after this load is, so replies keep their order.)
                    self._loads_in_flight += 1
                    self._nursery.start_soon(self._answer_load, conn, message, self._unloads)
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

    async def _answer_load(self, conn: Connection, message: LoadSlice, unloads: int) -> None:
        try:
            await self._answer(conn, message, unloads)
        finally:
            self._loads_in_flight -= 1
            if not self._loads_in_flight:
                self._loads_answered.set()
                self._loads_answered = trio.Event()

    async def _answer(self, conn: Connection, message: Message, unloads: int = 0) -> None:
        try:
            reply = await self._control(conn, message, unloads)
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

    async def _control(
        self, conn: Connection, message: Message, unloads: int | None = None
    ) -> Message | None:
        if isinstance(message, StatusRequest):
            return self.status()
        if isinstance(message, ProfileRequest):
            return await self.measurements.profile(message.dtype, message.hidden, message.bits)
        if isinstance(message, HaveRequest):
            held = await trio.to_thread.run_sync(self.weights.held, message.model_id)
            return Have(message.model_id, held)
        if isinstance(message, ProbeLink):
            return await self.measurements.probe(message)
        if isinstance(message, LoadSlice):
            self.controller = conn
            return await self._load(message, unloads)
        if isinstance(message, Unload):
            self._unloads += 1  # a load asked for before this one does not start
            if self._loading is not None:  # a load under way stops first
                self._loading.cancel()
            while self._loads_in_flight:  # and is answered first
                await self._loads_answered.wait()
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
