"""What several benchmark modes share: timing a stream of tokens, and rings of
``dnet-peer`` processes on loopback. Imported by ``scripts/bench.py`` and its
modes, after ``bench.py`` has loaded OpenBLAS."""

from __future__ import annotations

import os
import sys
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
    import re
    import subprocess

    procs = []
    for i in range(n):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dnet.cli_peer",
                "--state-dir",
                str(state / f"p{i}"),
                "--cluster-key-file",
                str(key_file),
                "--name",
                f"bench{i}",
                "--no-mdns",
                "--log-level",
                "WARNING",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = proc.stdout.readline()
        match = re.search(r"listening (ws://\S+) peer-id=(\S+)", line)
        if not match:
            raise RuntimeError(f"dnet-peer did not start: {line!r}")
        procs.append((proc, match.group(1), match.group(2)))
    return procs


def _stop_peers(procs) -> None:
    import signal
    import subprocess

    for proc, _, _ in procs:
        proc.send_signal(signal.SIGTERM)
    for proc, _, _ in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


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
    from dnet.head.ring import PlanEntry, open_ring
    from dnet.identity import Identity

    key = bytes.fromhex(os.environ["DNET_BENCH_KEY"])
    async with open_ring([a for _, a, _ in procs], Identity.generate(), key) as ring:
        t0 = time.perf_counter()
        await ring.load(
            str(path),
            [PlanEntry(pid, s, e) for (_, _, pid), (s, e) in zip(procs, cuts, strict=True)],
            compute_dtype=compute_dtype,
        )
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
