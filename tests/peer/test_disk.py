"""The disk a peer's weights take: ``--max-disk`` evicts the models used least
recently (never the one loading), and ``dnet-peer models`` lists and removes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from dnet.errors import OverDiskBudget
from dnet.head.cluster import open_cluster
from dnet.head.loading import PlanEntry
from dnet.identity import Identity
from dnet.models.manifest import build_manifest
from dnet.models.model_dir import open_model_dir
from dnet.peer.disk import make_room, stored_models

from ..processes import CLUSTER_KEY, open_peers

MiB = 1 << 20


def fake_model(root, model_id, mib, used_at):
    d = root / model_id
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x" * (mib * MiB))
    (d / "have.json").write_text(json.dumps([["model.safetensors", 0, mib * MiB, "00"]]))
    (d / "used").touch()
    os.utime(d / "used", (used_at, used_at))


def test_room_is_made_least_recently_used_first(tmp_path):
    now = time.time()
    fake_model(tmp_path, "dm" + "a" * 40, 3, now - 300)
    fake_model(tmp_path, "dm" + "b" * 40, 3, now - 100)
    fake_model(tmp_path, "dm" + "c" * 40, 3, now - 200)
    loading = "dm" + "d" * 40
    evicted = make_room(tmp_path, loading, 4 * MiB, 9 * MiB)
    assert evicted == ["dm" + "a" * 40, "dm" + "c" * 40]  # oldest first, just enough
    assert sorted(m.model_id for m in stored_models(tmp_path)) == ["dm" + "b" * 40]
    assert (tmp_path / loading / "used").exists()  # the one loading is now the newest
    with pytest.raises(OverDiskBudget, match="--max-disk"):
        make_room(tmp_path, loading, 10 * MiB, 9 * MiB)


def run_models(*args, state):
    return subprocess.run(
        [sys.executable, "-m", "dnet.cli_peer", "models", *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dnet_peer_models_lists_and_removes(tmp_path):
    now = time.time()
    store = tmp_path / "weights"
    fake_model(store, "dm" + "a" * 40, 1, now - 50)
    fake_model(store, "dm" + "b" * 40, 2, now - 10)
    listed = run_models(state=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].startswith("2 models in") and "3.0 MiB" in lines[0]
    assert lines[1].startswith("dm" + "a" * 40) and lines[2].startswith("dm" + "b" * 40)
    gone = run_models("rm", "dm" + "a" * 40, state=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert not (store / ("dm" + "a" * 40)).exists() and (store / ("dm" + "b" * 40)).exists()
    missing = run_models("rm", "../weights", state=tmp_path)
    assert missing.returncode == 1 and "no model ../weights" in missing.stderr
    assert (store / ("dm" + "b" * 40)).exists()


async def test_a_peer_over_its_disk_budget_evicts_the_model_it_no_longer_uses(tiny_model):
    a = open_model_dir(tiny_model(arch="qwen3", layers=4, hidden=128, seed=1))
    b = open_model_dir(tiny_model(arch="qwen3", layers=4, hidden=128, seed=2))
    ids = [build_manifest(m).model_id for m in (a, b)]
    budget = int(1.5 * max(build_manifest(m).size for m in (a, b)))
    async with (
        open_peers(1, max_disk=budget) as peers,
        open_cluster([peers[0][0]], Identity.generate(), CLUSTER_KEY) as cluster,
    ):
        store = peers[0][1].weights.root
        plan = [PlanEntry(cluster.peers[0].peer_id, 0, 4)]
        ring = await cluster.load(a, plan)
        await ring.unload()
        assert [m.model_id for m in stored_models(store)] == [ids[0]]
        await cluster.load(b, plan)
        assert [m.model_id for m in stored_models(store)] == [ids[1]]
        assert sum(m.disk_bytes for m in stored_models(store)) <= budget
