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
from .conftest import load_split, start_cluster, stop_cluster


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


def _chat(c, max_tokens: int = 2) -> httpx.Response:
    body = {
        "model": str(c.model),
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
    }
    return httpx.post(c.url + "/v1/chat/completions", json=body, timeout=30)


def _until_served(c, seconds: float) -> float:
    """Seconds until a chat request is answered (polling, no load_model)."""
    start = time.monotonic()
    while (answer := _chat(c)).status_code != 200:
        assert answer.status_code in (502, 503), answer.text
        assert time.monotonic() - start < seconds, c.console.log()[-3000:]
        time.sleep(0.25)
    return time.monotonic() - start


def _peer_count(c) -> int:
    topology = c.get("/v1/topology").json()
    return len(topology["assignments"])


def test_a_lost_peer_is_planned_around_and_used_again_when_it_returns(tiny_model, tmp_path):
    from ..processes import PeerProcess

    model = tiny_model(arch="qwen3", layers=4, hidden=64)
    c = start_cluster(tmp_path, model, 2)
    try:
        load_split(c)
        assert _peer_count(c) == 2
        victim = c.peers[1]
        port = victim.address.rsplit(":", 1)[1].split("/")[0]
        victim.kill()
        victim.stop()  # reaped; its pipes closed
        served = _until_served(c, 30)
        print(f"kill -9 of a peer: served again after {served:.2f} s")
        assert _peer_count(c) == 1 and c.get("/health").json()["state"] == "loaded"
        # The same peer (its state dir, so its id) comes back on its port.
        started = time.monotonic()
        c.peers[1] = PeerProcess(
            tmp_path / "peer1", tmp_path / "cluster.key", "ap1", "--port", port
        )
        c.wait(lambda: _peer_count(c) == 2, 30, "the returning peer is used again")
        print(f"the restarted peer was used again after {time.monotonic() - started:.2f} s")
        assert _chat(c).status_code == 200
    finally:
        stop_cluster(c)


def test_a_paused_peer_is_reported_not_responding_and_service_resumes(tiny_model, tmp_path):
    model = tiny_model(arch="qwen3", layers=4, hidden=64)
    c = start_cluster(tmp_path, model, 2)
    paused = None
    try:
        load_split(c)
        body = {
            "model": str(model),
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 2000,
            "stream": True,
        }
        with httpx.stream("POST", c.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            paused = c.peers[1]
            os.kill(paused.proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            error = next(line for line in lines if '"error"' in line)
            heard = time.monotonic() - stopped
        assert "not responding" in error, error
        assert heard < 10, heard
        served = _until_served(c, 30)
        print(f"SIGSTOP: 'not responding' after {heard:.2f} s; served again {served:.2f} s later")
    finally:
        if paused is not None:
            os.kill(paused.proc.pid, signal.SIGCONT)
        stop_cluster(c)
