"""``bench.py transfer``: how fast weights reach peers that do not have them.

A 2-peer ring loads a model the peers have never seen (fresh weight stores), so
each fetches its slice from the head over the sealed link; then the same bytes
are copied as a plain file copy, for comparison; then the ring loads again, with
everything already in the stores.
"""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import trio

from dnet.head.cluster import open_cluster
from dnet.head.loading import PlanEntry
from dnet.identity import Identity
from dnet.models.manifest import build_manifest
from dnet.models.model_dir import open_model_dir
from dnet.peer.process import PeerProcess, stop_all
from dnet.runtime.local import even_cuts


def _copy_rate(model_dir: Path) -> float:
    """Bytes per second of a plain copy of the model's weight files."""
    files = sorted(model_dir.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        for f in files:
            shutil.copyfile(f, Path(tmp) / f.name)
        return sum(f.stat().st_size for f in files) / (time.perf_counter() - started)


async def _loads(addresses: list[str], ids: list[str], key: bytes, model) -> dict:
    cuts = even_cuts(model.num_layers, len(addresses))
    plan = [PlanEntry(pid, s, e) for pid, (s, e) in zip(ids, cuts, strict=True)]
    out = {}
    async with open_cluster(addresses, Identity.generate(), key) as cluster:
        for run in ("cold", "warm"):
            started = time.perf_counter()
            ring = await cluster.load(model, plan)
            out[run] = {
                "load_s": time.perf_counter() - started,
                "fetched_bytes": [r.fetched_bytes for r in ring.loaded],
                "fetch_s": [r.fetch_seconds for r in ring.loaded],
            }
            await ring.unload()
    return out


def bench_transfer(args) -> dict:
    model = open_model_dir(args.model)
    started = time.perf_counter()
    manifest = build_manifest(model)
    hash_s = time.perf_counter() - started
    key = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "cluster.key"
        key_file.write_text(key.hex())
        peers = [
            PeerProcess(Path(tmp) / f"p{i}", f"t{i}", "--log-level", "WARNING", key_file=key_file)
            for i in range(args.peers)
        ]
        try:
            loads = trio.run(
                _loads, [p.address for p in peers], [p.peer_id for p in peers], key, model
            )
        finally:
            stop_all(peers)
    fetched = sum(loads["cold"]["fetched_bytes"])
    copy_rate = _copy_rate(model.path)
    rate = fetched / loads["cold"]["load_s"]
    # Each peer's own rate: its bytes over the time it spent fetching (both peers
    # fetch at once, sharing the head and the 2 cores).
    per_peer = [
        b / s if s else 0.0
        for b, s in zip(loads["cold"]["fetched_bytes"], loads["cold"]["fetch_s"], strict=True)
    ]
    together = fetched / max(loads["cold"]["fetch_s"])
    return {
        "mode": "transfer",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "model": str(model.path),
        "model_bytes": manifest.size,
        "manifest_hash_s": hash_s,
        "loads": loads,
        "cold_load_bytes_per_s": rate,
        "fetch_bytes_per_s_per_peer": per_peer,
        "fetch_bytes_per_s_together": together,
        "fetch_ratio_to_copy": together / copy_rate,
        "plain_copy_bytes_per_s": copy_rate,
        "ratio_to_copy": rate / copy_rate,
    }


def add_parser(sub) -> None:
    t = sub.add_parser("transfer", help="peers fetch a model they lack from the head")
    t.add_argument("--model", required=True, help="a model directory (safetensors)")
    t.add_argument("--peers", type=int, default=2)
    t.add_argument("--out", help="also write the JSON report here")
