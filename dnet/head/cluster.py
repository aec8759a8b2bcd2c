"""``Cluster``: the peers the head is connected to, their link measurements, and
membership events; it opens the ring of a loaded model over them.

Each peer connection is a task of the cluster's nursery. Messages about requests
(tokens, request errors) go to the loaded ring, if any; so does the news that a
peer left.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from dnet.config import default_cache_dir
from dnet.errors import DuplicatePeer, PeerUnavailable
from dnet.head.loaded_ring import LoadedRing, machines
from dnet.head.loading import (
    PlanEntry,
    Progress,
    check_plan,
    find_holders,
    load_slices,
    quietly,
)
from dnet.head.peers import PeerClient
from dnet.head.spans import SpanServer
from dnet.identity import Identity, verify_signature
from dnet.models.hub import open_model
from dnet.models.manifest import Manifest, build_manifest, manifest_for
from dnet.models.model_dir import ModelDir
from dnet.models.tokenizer import load_tokenizer
from dnet.protocol.messages import Error, Status, StepTokens, Token
from dnet.transport.connection import open_connection

log = logging.getLogger(__name__)


class Cluster:
    """Connected peers; use ``open_cluster``."""

    def __init__(
        self,
        nursery: trio.Nursery,
        identity: Identity,
        cluster_key: bytes,
        name: str,
        decode_lanes: int | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self._nursery = nursery
        self._cache_dir = cache_dir  # manifests of models, hashed once
        self._spans = SpanServer()
        self._identity = identity
        self._cluster_key = cluster_key
        self._name = name
        self.peers: list[PeerClient] = []
        self.duplicates: list[tuple[str, str]] = []  # (peer id, address) refused as clones
        # Measured links, (from, to) → (when, link): reused by the next prepare.
        self.link_cache: dict[tuple[str, str], tuple[float, Any]] = {}
        self.decode_lanes = decode_lanes  # None: one per machine of the ring
        self.ring: LoadedRing | None = None
        self.closing = False
        self._membership = trio.Event()
        self._steps = itertools.count()  # step numbers, never reused across rings

    def _membership_changed(self) -> None:
        self._membership.set()
        self._membership = trio.Event()

    @property
    def membership(self) -> trio.Event:
        """Set at the next change of ``peers`` (take it, then look, then wait)."""
        return self._membership

    async def wait_peers(self, count: int) -> None:
        """Return once at least ``count`` peers are connected."""
        while len(self.peers) < count:
            await self._membership.wait()

    def peer(self, peer_id: str) -> PeerClient:
        """Raises:
        PeerUnavailable: no connected peer has that id.
        """
        for p in self.peers:
            if p.peer_id == peer_id:
                return p
        raise PeerUnavailable(f"no connected peer has id {peer_id}")

    async def status(self) -> list[Status]:
        return [await p.call_status() for p in self.peers]

    # -- membership -----------------------------------------------------------------

    async def connect(self, address: str, expected_peer_id: str | None = None) -> PeerClient:
        """Connect to one more peer; it stays in ``peers`` while connected.

        Raises:
            PeerUnavailable, HandshakeFailed, DuplicatePeer
        """
        client: PeerClient = await self._nursery.start(self._hold, address, expected_peer_id)
        return client

    async def _hold(
        self, address: str, expected: str | None, *, task_status: trio.TaskStatus[PeerClient]
    ) -> None:
        async with open_connection(
            address,
            self._identity,
            self._cluster_key,
            verify_signature,
            expected_peer_id=expected,
            name=self._name,
        ) as conn:
            client = PeerClient(conn, address)
            client.on_fetch = lambda peer, message: self._nursery.start_soon(
                self._spans.send, peer, message
            )
            twin = next((p for p in self.peers if p.peer_id == client.peer_id and p.alive), None)
            if twin is not None:
                if twin.address == address:
                    task_status.started(twin)  # already connected to this one
                    return
                # Two live peers proving one id: a cloned state directory. Report it.
                self.duplicates.append((client.peer_id, address))
                raise DuplicatePeer(
                    f"{address} proves peer id {client.peer_id[:12]}, already live at "
                    f"{twin.address}: a copied state directory? Give each install its own."
                )
            self.peers.append(client)
            self._membership_changed()
            log.info("peer %s joined", client.label)
            task_status.started(client)
            try:
                await client.serve(self._on_request_message, self._on_closed)
            finally:
                self.peers.remove(client)
                self._membership_changed()

    def _on_request_message(self, message: Token | StepTokens | Error) -> None:
        if self.ring is not None:
            self.ring.on_message(message)

    def _on_closed(self, peer: PeerClient, why: str) -> None:
        if self.closing:
            return
        log.warning("peer %s left: it %s", peer.label, why)
        if self.ring is not None:
            self.ring.peer_lost(peer, why)

    # -- the loaded model ------------------------------------------------------------

    @asynccontextmanager
    async def open_ring(
        self,
        model: ModelDir | str,
        plan: Sequence[PlanEntry],
        *,
        max_context: int | None = None,
        compute_dtype: str | None = None,
        on_progress: Progress | None = None,
    ) -> AsyncIterator[LoadedRing]:
        """Load ``model`` across the peers named by ``plan`` (ring order; ranges must
        tile all layers) and unload it on exit; a loaded ring is unloaded first. Peers
        get their slices' weights by manifest (see ``load_slices``).

        Raises:
            LayerRangeError, PeerUnavailable, PeerError, ModelNotFound, InvalidModel
        """
        if not isinstance(model, ModelDir):
            model = await self.open_model(model)
        check_plan(plan, model.num_layers)
        order = [self.peer(e.peer_id) for e in plan]
        manifest = await self.manifest(model)
        eos = model.config.get("eos_token_id")
        tokenizer = await trio.to_thread.run_sync(load_tokenizer, model.path, eos)
        if self.ring is not None:
            await self.ring.unload()
        self._spans.register(model, manifest)
        try:
            loaded = await load_slices(
                model,
                manifest,
                plan,
                order,
                max_context=max_context,
                compute_dtype=compute_dtype,
                on_progress=on_progress,
                holders=await find_holders(self.peers, manifest.model_id),
            )
        except BaseException:
            self._spans.forget(manifest.model_id)
            raise
        lanes = self.decode_lanes or machines([p.address for p in order])
        ring = LoadedRing(
            order, model, tokenizer, loaded, max_context=max_context, lanes=lanes, steps=self._steps
        )
        self.ring = ring
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ring.serve_dispatch)
                try:
                    yield ring
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._spans.forget(manifest.model_id)
            if self.ring is ring:
                self.ring = None
            if not self.closing:  # on the cluster's end the connections close anyway
                with quietly():
                    await ring.unload()

    async def open_model(self, ref: str | Path) -> ModelDir:
        """A local model, or a repo id's stub from the hub (config, tokenizer and
        headers only: peers fetch their tensors from the hub).

        Raises:
            ModelNotFound, InvalidModel
        """
        cache = self._cache_dir or default_cache_dir(os.environ)
        return await trio.to_thread.run_sync(open_model, ref, cache)

    async def manifest(self, model: ModelDir) -> Manifest:
        """``model``'s manifest (hashed once: kept in the cache dir)."""
        return await trio.to_thread.run_sync(self._manifest, model)

    def _manifest(self, model: ModelDir) -> Manifest:
        if self._cache_dir is None:
            return build_manifest(model)
        return manifest_for(model, self._cache_dir)

    async def load(self, model: ModelDir | str, plan: Sequence[PlanEntry], **kw: Any) -> LoadedRing:
        """``open_ring``, held by the cluster until ``LoadedRing.unload`` (or the
        next load, or the cluster's end).

        Raises:
            as ``open_ring``
        """

        async def hold(task_status: trio.TaskStatus[LoadedRing]) -> None:
            async with self.open_ring(model, plan, **kw) as ring:
                task_status.started(ring)
                await ring.unloaded.wait()

        ring: LoadedRing = await self._nursery.start(hold)
        return ring


@asynccontextmanager
async def open_cluster(
    addresses: Sequence[str],
    identity: Identity,
    cluster_key: bytes,
    *,
    expected_peer_ids: Sequence[str | None] | None = None,
    name: str = "head",
    decode_lanes: int | None = None,
    cache_dir: Path | None = None,
) -> AsyncIterator[Cluster]:
    """Connect (and authenticate) to every address (more may join later through
    ``Cluster.connect``); closes all on exit.

    Raises:
        PeerUnavailable, HandshakeFailed
    """
    expected = list(expected_peer_ids or [None] * len(addresses))
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, identity, cluster_key, name, decode_lanes, cache_dir)
        try:
            for address, peer_id in zip(addresses, expected, strict=True):
                await cluster.connect(address, peer_id)
            yield cluster
        finally:
            cluster.closing = True
            nursery.cancel_scope.cancel()
