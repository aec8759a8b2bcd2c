"""Weights reach the peers from the head: each peer fetches exactly its slice's
spans, checks them, keeps them, resumes, and never opens a path it is sent."""

from __future__ import annotations

import pytest
import trio

from dnet.head import spans as spans_module
from dnet.head.cluster import open_cluster
from dnet.head.loading import PlanEntry
from dnet.identity import Identity, verify_signature
from dnet.models.manifest import build_manifest, bytes_of, slice_spans
from dnet.models.model_dir import open_model_dir
from dnet.protocol.messages import (
    Error,
    FetchSpan,
    FileSpans,
    Have,
    HaveRequest,
    LoadSlice,
    Span,
    SpanData,
    StatusRequest,
)
from dnet.transport.connection import open_connection

from ..processes import CLUSTER_KEY, open_peers

CUTS = [(0, 4), (4, 8)]


def plan(cluster):
    return [PlanEntry(p.peer_id, s, e) for p, (s, e) in zip(cluster.peers, CUTS, strict=True)]


@pytest.fixture
def model(tiny_model):
    return open_model_dir(tiny_model(arch="qwen3", layers=8, hidden=128, tie_embeddings=False))


async def test_each_peer_fetches_exactly_its_slice_once(model):
    manifest = build_manifest(model)
    expected = [bytes_of(slice_spans(manifest, model, s, e)) for s, e in CUTS]
    async with (
        open_peers(2) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        ring = await cluster.load(model, plan(cluster))
        fetched = [r.fetched_bytes for r in ring.loaded]
        assert fetched == expected
        assert all(f < 0.7 * manifest.size for f in fetched)  # neither gets the other half
        before = [e.token_id for e in await _generate(ring)]
        await ring.unload()
        again = await cluster.load(model, plan(cluster))
        assert [r.fetched_bytes for r in again.loaded] == [0, 0]  # all in the stores
        assert [e.token_id for e in await _generate(again)] == before


async def _generate(ring):
    from contextlib import aclosing

    async with aclosing(ring.generate([5, 9, 13, 200], max_tokens=8)) as events:
        return [e async for e in events]


async def test_a_flipped_byte_in_a_store_is_found_and_fetched_again(model):
    manifest = build_manifest(model)
    async with (
        open_peers(2) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        ring = await cluster.load(model, plan(cluster))
        store = peers[1][1].weights.root / manifest.model_id
        spans = slice_spans(manifest, model, *CUTS[1])
        name = next(n for n, s in spans.items() if any(x.name for x in s))
        victim = next(s for s in spans[name] if s.name.startswith("model.layers.6."))
        with (store / name).open("r+b") as f:
            f.seek(victim.begin + 3)
            byte = f.read(1)
            f.seek(victim.begin + 3)
            f.write(bytes([byte[0] ^ 0x40]))
        await ring.unload()
        again = await cluster.load(model, plan(cluster))
        assert [r.fetched_bytes for r in again.loaded] == [0, victim.end - victim.begin]


async def test_an_interrupted_fetch_resumes_with_what_is_missing(model, monkeypatch):
    manifest = build_manifest(model)
    whole = bytes_of(slice_spans(manifest, model, 0, 8))
    monkeypatch.setattr(spans_module, "PIECE_BYTES", 64 << 10)
    sent = []
    real = spans_module.SpanServer._reply

    async def reply_then_drop(self, peer, message, offset, data, error, last=True):
        if sum(sent) > whole // 3:  # a third through: the link drops
            await peer.conn.aclose()
            return False
        sent.append(len(data))
        return await real(self, peer, message, offset, data, error, last)

    async with (
        open_peers(1) as peers,
        open_cluster([peers[0][0]], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        one = [PlanEntry(cluster.peers[0].peer_id, 0, 8)]
        monkeypatch.setattr(spans_module.SpanServer, "_reply", reply_then_drop)
        with pytest.raises(Exception):  # noqa: B017 (PeerUnavailable or PeerError)
            await cluster.load(model, one)
        monkeypatch.setattr(spans_module.SpanServer, "_reply", real)
        with trio.fail_after(10):
            while cluster.peers:  # the dropped link leaves
                await cluster.membership.wait()
        await cluster.connect(peers[0][0])
        ring = await cluster.load(model, [PlanEntry(cluster.peers[0].peer_id, 0, 8)])
        got_before = sum(sent)
        assert whole // 3 < got_before < whole
        # The second time, only what had not fully arrived: the rest, and at most
        # the one tensor that was cut off.
        largest = max(s.end - s.begin for f in manifest.files for s in f.spans)
        assert whole - got_before <= ring.loaded[0].fetched_bytes <= whole - got_before + largest
        assert ring.loaded[0].fetched_bytes < whole


async def test_a_peer_never_opens_a_path_it_is_sent(model):
    async with open_peers(1) as peers:
        address = peers[0][0]
        async with open_connection(
            address, Identity.generate(), CLUSTER_KEY, verify_signature
        ) as head:
            # A path to a real model, and no manifest: refused, nothing read.
            await head.send(LoadSlice(str(model.path), 0, 8, True, True))
            with trio.fail_after(10):
                reply, _ = await head.receive()
            assert isinstance(reply, Error) and "model id" in reply.message
            # A manifest whose spans this "head" will not send: nothing loads.
            files = (FileSpans("config.json", 100, (Span(0, 100, "00" * 32),)),)
            await head.send(
                LoadSlice(str(model.path), 0, 8, True, True, model_id="dm" + "ab" * 20, files=files)
            )
            with trio.fail_after(10):
                while True:
                    message, _ = await head.receive()
                    if isinstance(message, FetchSpan):  # bytes that do not match the hash
                        piece = SpanData(message.model_id, message.file, message.begin, 0, True)
                        await head.send(piece, bytes(message.end - message.begin))
                    elif isinstance(message, Error):
                        break
            assert "do not match their hash" in message.message
            await head.send(StatusRequest())
            with trio.fail_after(10):
                status, _ = await head.receive()
            assert status.layers is None


async def test_load_progress_tells_bytes_source_and_rate_then_reading(model, monkeypatch):
    monkeypatch.setattr(spans_module, "PIECE_BYTES", 32 << 10)
    manifest = build_manifest(model)
    tensors = [slice_spans(manifest, model, s, e) for s, e in CUTS]
    expected = [sum(s.end - s.begin for v in t.values() for s in v if s.name) for t in tensors]
    steps = []
    async with (
        open_peers(2) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        p = plan(cluster)
        await cluster.load(model, p, on_progress=lambda pid, step: steps.append((pid, step)))
        for entry, total in zip(p, expected, strict=True):
            mine = [s for pid, s in steps if pid == entry.peer_id]
            fetching = [s for s in mine if s.phase == "fetching"]
            assert fetching and all(s.source == "head" and s.total == total for s in fetching)
            assert fetching[-1].done == total and fetching[-1].rate > 0
            assert [s.done for s in fetching] == sorted(s.done for s in fetching)
            reading = [i for i, s in enumerate(mine) if s.phase == "reading"]
            assert reading and min(reading) > mine.index(fetching[-1])  # fetched, then read


async def test_the_plan_counts_what_each_peer_must_fetch(model):
    """A prepared topology predicts each peer's fetch: the bytes of its slice its
    store lacks, over the head's measured link; after a load, none."""
    from dnet.head.topology import load_topology, prepare_topology

    manifest = build_manifest(model)
    async with (
        open_peers(2) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        topology = await prepare_topology(cluster, model, context=256)
        for a in topology.assignments:
            assert a.predicted_fetch_bytes == bytes_of(slice_spans(manifest, model, a.start, a.end))
            assert a.predicted_fetch_s is not None and a.predicted_fetch_s > 0
            assert a.predicted_load_s is not None and a.predicted_load_s > a.predicted_fetch_s
        ring = await load_topology(cluster, topology, model=model)
        await ring.unload()
        again = await prepare_topology(cluster, model, context=256)
        for a in again.assignments:
            held = await cluster.peer(a.peer_id).call(HaveRequest(manifest.model_id), Have)
            spans = slice_spans(manifest, model, a.start, a.end)
            lacking = sum(
                s.end - s.begin
                for n, v in spans.items()
                for s in v
                if (n, s.begin, s.end) not in set(held.spans)
            )
            assert a.predicted_fetch_bytes == lacking
        if [(a.peer_id, a.start, a.end) for a in again.assignments] == [
            (a.peer_id, a.start, a.end) for a in topology.assignments
        ]:
            assert all(a.predicted_fetch_bytes == 0 for a in again.assignments)
            assert all(a.predicted_fetch_s == 0.0 for a in again.assignments)


async def test_a_peer_fetches_what_another_peer_holds(model, monkeypatch):
    """A peer that lacks spans another peer's store holds fetches them from that
    peer (over their own sealed link), not from the head; a run it does not hold
    is refused."""
    manifest = build_manifest(model)
    whole = bytes_of(slice_spans(manifest, model, 0, 8))
    async with (
        open_peers(2) as peers,
        open_cluster([a for a, _ in peers], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        first, second = cluster.peers
        ring = await cluster.load(model, [PlanEntry(first.peer_id, 0, 8)])
        assert ring.loaded[0].fetched_bytes == whole
        await ring.unload()
        served = []
        real = spans_module.SpanServer.send

        async def head_send(self, peer, message):
            served.append(message.end - message.begin)
            await real(self, peer, message)

        monkeypatch.setattr(spans_module.SpanServer, "send", head_send)
        ring = await cluster.load(model, [PlanEntry(second.peer_id, 0, 8)])
        assert ring.loaded[0].fetched_bytes == whole
        assert sum(served) == 0  # all of it from the first peer
        store = next(d for a, d in peers if d.peer_id == second.peer_id).weights
        assert store.by_source == {f"peer {first.name}": whole}
        assert [e.token_id for e in await _generate(ring)]

        # The first peer serves only runs of spans it verified.
        holder = next(d for a, d in peers if d.peer_id == first.peer_id).weights
        name = next(f.name for f in manifest.files if f.name.endswith(".safetensors"))
        span = next(s for s in manifest.file(name).spans if s.name)
        assert holder.run_path(manifest.model_id, name, span.begin, span.end) is not None
        assert holder.run_path(manifest.model_id, name, span.begin + 1, span.end) is None
        assert holder.run_path(manifest.model_id, "../../etc/passwd", 0, 10) is None
        assert holder.run_path("dm" + "0" * 40, name, span.begin, span.end) is None


async def test_an_unload_calls_off_a_load_and_replies_keep_their_order(model):
    """A head that gives up on a load (cancelled at various points) and unloads:
    the peer calls the load off, answers it before the unload, and ends with
    nothing loaded; the next load pairs its reply right."""
    from dnet.head.loading import slice_message
    from dnet.protocol.messages import Loaded, Unload, Unloaded

    manifest = build_manifest(model)
    async with (
        open_peers(1) as peers,
        open_cluster([peers[0][0]], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        peer = cluster.peers[0]
        entries = [PlanEntry(peer.peer_id, 0, 8)]
        cluster._spans.register(model, manifest)
        message = slice_message(model, manifest, entries, [peer], 0)
        for delay in (0.001, 0.01, 0.05, 0.2):
            with trio.move_on_after(delay):
                await peer.call(message, Loaded)
            with trio.fail_after(30):
                await peer.call(Unload(), Unloaded)
                assert (await peer.call_status()).layers is None
        # A load and an unload sent back to back: the load is called off before
        # it starts, and answered first.
        async with peer._lock:  # as a call holds it; the replies are read here
            await peer.conn.send(message)
            await peer.conn.send(Unload())
            with trio.fail_after(30):
                replies = [await peer._reply_receive.receive() for _ in range(2)]
        assert isinstance(replies[0], Error) and replies[0].code == "load_cancelled"
        assert isinstance(replies[1], Unloaded)
        assert (await peer.call_status()).layers is None
        ring = await cluster.load(model, entries)
        assert len(await _generate(ring)) == 8
