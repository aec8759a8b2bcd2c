"""What happens when processes die under load: nothing is left behind, and the
cluster serves again without an operator."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import trio

from dnet.head.cluster import open_cluster
from dnet.identity import Identity

from ..processes import CLUSTER_KEY
from .conftest import load_split, start_cluster


def peer_requests(addresses: list[str]) -> list[int]:
    """Requests each peer holds, asked directly (the head may be gone)."""

    async def ask() -> list[int]:
        async with open_cluster(addresses, Identity.generate(), CLUSTER_KEY) as cluster:
            return [s.active_requests for s in await cluster.status()]

    return trio.run(ask)


def stream_forever(url: str, model: str, stop: threading.Event) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 2000,
        "stream": True,
    }
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return
    except httpx.HTTPError:
        return  # the head was killed


def test_a_killed_head_leaves_no_requests_on_the_peers(tiny_model, tmp_path):
    model = tiny_model(arch="qwen3", layers=4, hidden=64)
    c = start_cluster(tmp_path, model, 2)
    stop = threading.Event()
    streams = [
        threading.Thread(target=stream_forever, args=(c.url, str(model), stop), daemon=True)
        for _ in range(6)
    ]
    try:
        load_split(c)
        for t in streams:
            t.start()
        addresses = [p.address for p in c.peers]
        c.wait(lambda: min(c.peer_active()) >= 6, 30, "six requests on each peer")
        os.kill(c.console.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + 10
        while (held := peer_requests(addresses)) != [0, 0]:
            assert time.monotonic() < deadline, f"still held 10 s after the head died: {held}"
            time.sleep(0.2)
        print(f"peers freed every request {time.monotonic() - killed:.2f} s after kill -9")
    finally:
        stop.set()
        c.console.stop()
        for p in c.peers:
            p.stop()
        for t in streams:
            t.join(10)
