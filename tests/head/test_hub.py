"""Models from the hub (a stand-in on loopback, through ``HF_ENDPOINT``): the head
reads only headers and small files, and each peer (its own HOME and state dir)
fetches only its slice's tensors by range, verified and kept."""

from __future__ import annotations

import shutil
from contextlib import aclosing

import pytest
import trio

from dnet.head.cluster import open_cluster
from dnet.head.loading import PlanEntry
from dnet.identity import Identity
from dnet.models.hub import MARKER
from dnet.models.manifest import build_manifest, slice_spans
from dnet.models.model_dir import open_model_dir
from dnet.peer.process import stop_all

from ..hub_standin import StandInHub
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
            async with open_cluster(
                [p.address for p in peers],
                Identity.generate(),
                CLUSTER_KEY,
                cache_dir=tmp_path / "head-cache",
            ) as cluster:
                model = await cluster.open_model(REPO)
                # The head read the headers and small files, no tensor.
                assert (model.path / MARKER).is_file()
                assert head_hub.sent["model.safetensors"] < 64 << 10
                plan = [
                    PlanEntry(p.peer_id, s, e)
                    for p, (s, e) in zip(cluster.peers, CUTS, strict=True)
                ]
                with trio.fail_after(120):
                    ring = await cluster.load(model, plan)
                    assert await generate(ring, prompt) == expected
                # Each peer downloaded its slice's tensors, and next to nothing more.
                for hub, spans in zip([hub0, hub1], slices, strict=True):
                    headers = sum(s.end - s.begin for v in spans.values() for s in v if not s.name)
                    assert tensor_bytes(spans) <= hub.sent["model.safetensors"]
                    assert hub.total <= 1.05 * tensor_bytes(spans) + headers
                # A second load takes nothing from the hub or the head.
                before = [hub0.total, hub1.total]
                await ring.unload()
                again = await cluster.load(model, plan)
                assert [r.fetched_bytes for r in again.loaded] == [0, 0]
                assert [hub0.total, hub1.total] == before
                assert await generate(again, prompt) == expected
        finally:
            stop_all(peers)
