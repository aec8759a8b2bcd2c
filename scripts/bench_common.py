"""What several benchmark modes share: timing a stream of tokens, and rings of
``dnet-peer`` processes on loopback. Imported by ``scripts/bench.py`` and its
modes, after ``bench.py`` has loaded OpenBLAS."""

from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

from mlx_lm import stream_generate

from dnet.runtime.local import even_cuts


def _time_stream(tokens):
    """(time to first token, decode tokens/s, ids) of an iterator of token ids."""
    start = time.perf_counter()
    ids, first = [], None
    for t in tokens:
        ids.append(t)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    decode = (len(ids) - 1) / (end - first) if len(ids) > 1 else 0.0
    return first - start, decode, ids


def run_mlx_lm(model, tokenizer, prompt, n):
    return _time_stream(r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=n))


def _start_peers(n: int, key_file: Path, state: Path) -> list:
    from dnet.peer.process import PeerProcess

    procs = []
    try:
        for i in range(n):
            procs.append(
                PeerProcess(
                    state / f"p{i}", f"bench{i}", "--log-level", "WARNING", key_file=key_file
                )
            )
    except BaseException:
        _stop_peers(procs)
        raise
    return procs


def _stop_peers(procs) -> None:
    from dnet.peer.process import stop_all

    stop_all(procs)


def _on_peers(n: int, layers: int, run, *args):
    """Start ``n`` dnet-peer processes sharing a fresh cluster key, return
    ``trio.run(run, procs, cuts, *args)`` (even cuts of ``layers``), stop them."""
    return on_peers(even_cuts(layers, n), run, *args)


def on_peers(cuts, run, *args):
    """``_on_peers`` with the layer ranges given: one peer per range."""
    n = len(cuts)
    import secrets
    import tempfile

    import trio

    key = secrets.token_hex(32)
    os.environ["DNET_BENCH_KEY"] = key
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "cluster.key"
        key_file.write_text(key)
        procs = _start_peers(n, key_file, Path(tmp))
        try:
            return trio.run(run, procs, list(cuts), *args)
        finally:
            _stop_peers(procs)


@asynccontextmanager
async def _loaded_ring(procs, path, cuts, compute_dtype=None):
    """A ring over ``procs`` with ``path`` loaded at ``cuts`` (weights widened to
    ``compute_dtype``); yields it and the seconds the load took."""
    from dnet.head.cluster import open_cluster
    from dnet.head.loading import PlanEntry
    from dnet.identity import Identity

    key = bytes.fromhex(os.environ["DNET_BENCH_KEY"])
    async with open_cluster([p.address for p in procs], Identity.generate(), key) as cluster:
        t0 = time.perf_counter()
        plan = [PlanEntry(p.peer_id, s, e) for p, (s, e) in zip(procs, cuts, strict=True)]
        async with cluster.open_ring(str(path), plan, compute_dtype=compute_dtype) as ring:
            yield ring, time.perf_counter() - t0


async def timed_generate(ring, prompt, k):
    """(time to first token, decode tokens/s, ids) of one request through ``ring``."""
    from contextlib import aclosing

    start = time.perf_counter()
    ids, first = [], None
    async with aclosing(ring.generate(prompt, max_tokens=k)) as events:
        async for e in events:
            ids.append(e.token_id)
            first = first or time.perf_counter()
    end = time.perf_counter()
    return first - start, (len(ids) - 1) / (end - first) if len(ids) > 1 else 0.0, ids


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]
