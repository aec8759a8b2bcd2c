"""Models from the hub (a stand-in on loopback, through ``HF_ENDPOINT``): the head
reads only headers and small files, and each peer (its own HOME and state dir)
fetches only its slice's tensors by range, verified and kept."""

from __future__ import annotations

import os
import shutil
from contextlib import aclosing

import pytest
import trio

from dnet.errors import DnetError, ModelNotFound, PeerError
from dnet.head.cluster import open_cluster
from dnet.head.loading import PlanEntry
from dnet.identity import Identity
from dnet.models.hub import MARKER
from dnet.models.manifest import build_manifest, slice_spans
from dnet.models.model_dir import open_model_dir
from dnet.peer.process import stop_all
from dnet.protocol.messages import Status, StatusRequest

from ..hub_standin import COMMIT, StandInHub
from ..processes import CLUSTER_KEY, PeerProcess
from .test_ring import chat, reference

REPO = "dnet-test/tiny-qwen3"
CUTS = [(0, 3), (3, 8)]
N = 12


@pytest.fixture
def repo(tiny_model, tmp_path):
    """The files of a tiny model as a hub repo holds them."""
    source = tiny_model(arch="qwen3", layers=8, hidden=128, tie_embeddings=False)
    files = tmp_path / "repo"
    shutil.copytree(source, files)
    return files


def peers_with_own_homes(tmp_path, hubs):
    key = tmp_path / "cluster.key"
    key.write_text(CLUSTER_KEY.hex())
    peers = []
    try:
        for i, hub in enumerate(hubs):
            home = tmp_path / f"home{i}"
            env = {"HOME": str(home), "HF_HOME": str(home / ".cache/huggingface")}
            env["HF_ENDPOINT"] = hub.endpoint
            peers.append(PeerProcess(tmp_path / f"state{i}", key, f"hub{i}", env=env))
    except BaseException:
        stop_all(peers)
        raise
    return peers


def head_of(peers, tmp_path):
    """A head over ``peers`` with its cache in ``tmp_path``."""
    return open_cluster(
        [p.address for p in peers],
        Identity.generate(),
        CLUSTER_KEY,
        cache_dir=tmp_path / "head-cache",
    )


def split(cluster):
    """The plan of ``CUTS`` over the cluster's peers, in the order they connected."""
    return [PlanEntry(p.peer_id, s, e) for p, (s, e) in zip(cluster.peers, CUTS, strict=True)]


def assert_each_fetched_its_slice(hubs, slices, file):
    """Each peer's stand-in sent it its slice's tensors of ``file``, and next to
    nothing more (headers, small files, 5%)."""
    for hub, spans in zip(hubs, slices, strict=True):
        headers = sum(s.end - s.begin for v in spans.values() for s in v if not s.name)
        assert tensor_bytes(spans) <= hub.sent[file]
        assert hub.total <= 1.05 * tensor_bytes(spans) + headers


def tensor_bytes(spans):
    return sum(s.end - s.begin for v in spans.values() for s in v if s.name)


async def generate(ring, prompt):
    async with aclosing(ring.generate(prompt, max_tokens=N)) as events:
        return [e.token_id async for e in events]


async def test_a_ring_loads_a_model_only_the_hub_has(repo, tmp_path, monkeypatch):
    prompt = chat(repo)
    expected = reference(repo, prompt, N)
    full = open_model_dir(repo)
    manifest = build_manifest(full)
    slices = [slice_spans(manifest, full, s, e) for s, e in CUTS]
    with (
        StandInHub({REPO: repo}) as head_hub,
        StandInHub({REPO: repo}) as hub0,
        StandInHub({REPO: repo}) as hub1,
    ):
        monkeypatch.setenv("HF_ENDPOINT", head_hub.endpoint)
        peers = peers_with_own_homes(tmp_path, [hub0, hub1])
        try:
            async with head_of(peers, tmp_path) as cluster:
                model = await cluster.open_model(REPO)
                # The head read the headers and small files, no tensor.
                assert (model.path / MARKER).is_file()
                assert head_hub.sent["model.safetensors"] < 64 << 10
                plan = split(cluster)
                with trio.fail_after(120):
                    ring = await cluster.load(model, plan)
                    assert await generate(ring, prompt) == expected
                # Each peer downloaded its slice's tensors, and next to nothing more.
                assert_each_fetched_its_slice([hub0, hub1], slices, "model.safetensors")
                # A second load takes nothing from the hub or the head.
                before = [hub0.total, hub1.total]
                await ring.unload()
                again = await cluster.load(model, plan)
                assert [r.fetched_bytes for r in again.loaded] == [0, 0]
                assert [hub0.total, hub1.total] == before
                assert await generate(again, prompt) == expected
                # A flipped byte in what came from the hub (no hash in the manifest:
                # the peer kept the one it computed) is found and fetched again.
                model_id = (await trio.to_thread.run_sync(build_manifest, model)).model_id
                victim = next(s for s in slices[1]["model.safetensors"] if "layers.5." in s.name)
                stored = tmp_path / "state1/weights" / model_id / "model.safetensors"
                flip(stored, victim.begin + 7)
                await again.unload()
                third = await cluster.load(model, plan)
                assert [r.fetched_bytes for r in third.loaded] == [0, victim.end - victim.begin]
                assert await generate(third, prompt) == expected
        finally:
            stop_all(peers)


def flip(path, at):
    with path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))


def hf_cache_copy(home, repo):
    """``repo`` in the HF cache under ``home``, laid out as huggingface_hub does:
    snapshot files linking to blobs named by their hash."""
    import hashlib

    cache = home / ".cache/huggingface/hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = cache / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (cache / "blobs").mkdir()
    for f in repo.iterdir():
        blob = cache / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(blob)


async def test_peers_use_copies_they_already_have(repo, tmp_path, monkeypatch):
    """One peer has the repo in its HF cache, the other a copy in --models-dir:
    neither downloads a tensor, from the hub or the head."""
    prompt = chat(repo)
    expected = reference(repo, prompt, N)
    hf_cache_copy(tmp_path / "home0", repo)
    shutil.copytree(repo, tmp_path / "models/tiny")
    key = tmp_path / "cluster.key"
    key.write_text(CLUSTER_KEY.hex())
    with StandInHub({REPO: repo}) as head_hub, StandInHub({REPO: repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", head_hub.endpoint)
        env = {"HF_ENDPOINT": hub.endpoint}
        home0 = {
            "HOME": str(tmp_path / "home0"),
            "HF_HOME": str(tmp_path / "home0/.cache/huggingface"),
        }
        home1 = {
            "HOME": str(tmp_path / "home1"),
            "HF_HOME": str(tmp_path / "home1/.cache/huggingface"),
        }
        peers = [PeerProcess(tmp_path / "state0", key, "cached", env={**env, **home0})]
        try:
            peers.append(
                PeerProcess(
                    tmp_path / "state1",
                    key,
                    "copied",
                    "--models-dir",
                    str(tmp_path / "models"),
                    env={**env, **home1},
                )
            )
            async with head_of(peers, tmp_path) as cluster:
                plan = split(cluster)
                for ref in (REPO, repo):  # from the hub's stub; from the head's own copy
                    model = await cluster.open_model(str(ref))
                    with trio.fail_after(120):
                        ring = await cluster.load(model, plan)
                    assert [r.fetched_bytes for r in ring.loaded] == [0, 0]
                    assert hub.sent["model.safetensors"] == 0
                    assert await generate(ring, prompt) == expected
                    await ring.unload()
        finally:
            stop_all(peers)


async def test_a_repo_the_hub_cannot_give_is_not_found(tmp_path):
    async with open_cluster([], Identity.generate(), CLUSTER_KEY, cache_dir=tmp_path) as cluster:
        with trio.fail_after(30), pytest.raises(ModelNotFound, match="the hub cannot give it"):
            await cluster.open_model("dnet-test/no-such-model")
    with StandInHub({}) as hub:
        os.environ["HF_ENDPOINT"], old = hub.endpoint, os.environ["HF_ENDPOINT"]
        try:
            async with open_cluster(
                [], Identity.generate(), CLUSTER_KEY, cache_dir=tmp_path
            ) as cluster:
                with pytest.raises(ModelNotFound, match="dnet-test/no-such-model"):
                    await cluster.open_model("dnet-test/no-such-model")
        finally:
            os.environ["HF_ENDPOINT"] = old


async def test_a_slice_no_source_can_give_fails_the_load_at_once(repo, tmp_path, monkeypatch):
    """A hub that ignores byte ranges, and a head with only the headers: the load
    fails in seconds (not after the next peer's wait), saying what each source said,
    and nothing stays loaded."""
    with StandInHub({REPO: repo}) as head_hub, StandInHub({REPO: repo}, ranges=False) as hub:
        monkeypatch.setenv("HF_ENDPOINT", head_hub.endpoint)
        peers = peers_with_own_homes(tmp_path, [hub, hub])
        try:
            async with head_of(peers, tmp_path) as cluster:
                model = await cluster.open_model(REPO)
                plan = split(cluster)
                with trio.fail_after(30), pytest.raises(PeerError) as failed:
                    await cluster.load(model, plan)
                assert "no source gave bytes" in failed.value.message
                assert "hub: the hub answered 200" in failed.value.message
                assert "head: the head cannot send" in failed.value.message
                assert cluster.ring is None
                statuses = [await p.call(StatusRequest(), Status) for p in cluster.peers]
                assert [s.layers for s in statuses] == [None, None]
        finally:
            stop_all(peers)


async def test_one_gguf_file_of_a_hub_repo(repo, tmp_path, monkeypatch):
    """``org/name/file.gguf``: the head reads that file's GGUF header by range; each
    peer fetches its slice's tensors of it, and the ring answers as it does from
    the head's own copy of the file."""
    from ..models.gguf_files import write_gguf

    files = tmp_path / "gguf-repo"
    files.mkdir()
    gguf = write_gguf(repo, files / "tiny-q8.gguf", "Q8_0")
    write_gguf(repo, files / "tiny-f16.gguf", "F16")
    local = open_model_dir(gguf)
    manifest = build_manifest(local)
    slices = [slice_spans(manifest, local, s, e) for s, e in CUTS]
    prompt = [5, 9, 13, 200, 31]
    with (
        StandInHub({REPO: files}) as head_hub,
        StandInHub({REPO: files}) as hub0,
        StandInHub({REPO: files}) as hub1,
    ):
        monkeypatch.setenv("HF_ENDPOINT", head_hub.endpoint)
        peers = peers_with_own_homes(tmp_path, [hub0, hub1])
        try:
            async with head_of(peers, tmp_path) as cluster:
                plan = split(cluster)
                ring = await cluster.load(local, plan)
                expected = await generate(ring, prompt)
                await ring.unload()
                for i in range(len(peers)):  # forget what came from the head
                    shutil.rmtree(tmp_path / f"state{i}/weights")
                model = await cluster.open_model(f"{REPO}/tiny-q8.gguf")
                assert model.is_gguf and head_hub.sent["tiny-f16.gguf"] == 0
                assert head_hub.sent["tiny-q8.gguf"] < gguf.stat().st_size / 2
                with trio.fail_after(120):
                    ring = await cluster.load(model, plan)
                assert await generate(ring, prompt) == expected
                assert_each_fetched_its_slice([hub0, hub1], slices, "tiny-q8.gguf")
                assert hub0.sent["tiny-f16.gguf"] == hub1.sent["tiny-f16.gguf"] == 0
        finally:
            stop_all(peers)


async def test_a_peer_killed_halfway_fetches_only_the_rest(repo, tmp_path, monkeypatch):
    """kill -9 of a peer halfway through its fetch from a slow hub: started again
    on the same state dir, it fetches what had not arrived (give or take what
    arrived in its last second, which it had not yet recorded)."""
    from dnet.peer.weights import SAVE_EVERY_S

    full = open_model_dir(repo)
    spans = slice_spans(build_manifest(full), full, 0, 8)
    needed = sum(s.end - s.begin for s in spans["model.safetensors"])
    rate = needed / 4  # four seconds for the whole slice
    largest = max(s.end - s.begin for s in spans["model.safetensors"])
    key = tmp_path / "cluster.key"
    key.write_text(CLUSTER_KEY.hex())
    home = tmp_path / "home"
    env = {"HOME": str(home), "HF_HOME": str(home / ".cache/huggingface")}
    with (
        StandInHub({REPO: repo}) as head_hub,
        StandInHub({REPO: repo}, bytes_per_s=rate) as hub,
    ):
        monkeypatch.setenv("HF_ENDPOINT", head_hub.endpoint)
        env["HF_ENDPOINT"] = hub.endpoint
        peers = [PeerProcess(tmp_path / "state", key, "resumer", env=env)]
        try:
            async with head_of(peers, tmp_path) as cluster:
                model = await cluster.open_model(REPO)
                plan = [PlanEntry(peers[0].peer_id, 0, 8)]

                async def load() -> None:
                    with pytest.raises(DnetError):
                        await cluster.load(model, plan)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(load)
                    with trio.fail_after(30):
                        while hub.sent["model.safetensors"] < needed / 2:
                            await trio.sleep(0.01)
                    peers[0].kill()
                first = hub.sent["model.safetensors"]
                hub.bytes_per_s = None
                peers.append(PeerProcess(tmp_path / "state", key, "resumer", env=env))
                await cluster.connect(peers[1].address)
                ring = await cluster.load(model, plan)
                second = hub.sent["model.safetensors"] - first
                rest = needed - first
                assert rest <= second <= rest + rate * SAVE_EVERY_S * 1.5 + largest
                assert second < 0.75 * needed
                assert await generate(ring, [5, 9, 13]) == reference(repo, [5, 9, 13], N)
        finally:
            stop_all(peers)


async def test_a_ring_loads_a_model_only_the_head_has(repo, tmp_path):
    """A model directory on the head alone: peers with their own HOME and state
    (and a hub that has nothing) fetch exactly their slices from the head."""
    prompt = chat(repo)
    expected = reference(repo, prompt, N)
    model = open_model_dir(repo)
    manifest = build_manifest(model)
    slices = [slice_spans(manifest, model, s, e) for s, e in CUTS]
    with StandInHub({}) as hub:
        peers = peers_with_own_homes(tmp_path, [hub, hub])
        try:
            async with head_of(peers, tmp_path) as cluster:
                plan = split(cluster)
                with trio.fail_after(120):
                    ring = await cluster.load(model, plan)
                fetched = [r.fetched_bytes for r in ring.loaded]
                assert fetched == [
                    sum(s.end - s.begin for v in x.values() for s in v) for x in slices
                ]
                assert all(
                    f <= 1.05 * tensor_bytes(x) + (64 << 10)
                    for f, x in zip(fetched, slices, strict=True)
                )
                assert hub.total == 0
                assert await generate(ring, prompt) == expected
        finally:
            stop_all(peers)
