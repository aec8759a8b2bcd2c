"""A real head (``dnet-console --headless``) over real ``dnet-peer`` processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import httpx
import pytest

from ..processes import CLUSTER_KEY, ConsoleProcess, PeerProcess


@attrs.define
class Cluster:
    url: str
    model: Path | str
    peers: list[PeerProcess]
    console: ConsoleProcess
    headers: dict[str, str] = attrs.Factory(dict)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=30)

    def post(self, path: str, body: object) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers, timeout=60)

    def wait(self, check: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} within {seconds}s\n{self.console.log()[-3000:]}")
            time.sleep(0.05)

    def peer_active(self) -> list[int]:
        return [d["status"]["active_requests"] for d in self.get("/v1/devices").json()["data"]]


def start_cluster(
    root: Path,
    model: Path | str,
    n_peers: int,
    *console_args: str,
    headers: dict | None = None,
    peer_args: tuple[str, ...] = (),
    console_env: dict[str, str] | None = None,
) -> Cluster:
    root.mkdir(parents=True, exist_ok=True)
    key_file = root / "cluster.key"
    key_file.write_text(CLUSTER_KEY.hex())
    peers: list[PeerProcess] = []
    try:
        for i in range(n_peers):
            peers.append(PeerProcess(root / f"peer{i}", key_file, f"ap{i}", *peer_args))
        addresses = [p.address for p in peers]
        console = ConsoleProcess(root / "head", key_file, addresses, *console_args, env=console_env)
    except BaseException:
        for p in peers:
            p.stop()
        raise
    cluster = Cluster(console.url, model, peers, console, headers or {})
    if n_peers:
        cluster.wait(
            lambda: len(cluster.get("/v1/devices").json()["data"]) == n_peers,
            20,
            "peers connect",
        )
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    assert cluster.console.stop() == 0, cluster.console.log()[-3000:]
    for p in cluster.peers:
        p.stop()


def load_split(cluster: Cluster) -> dict:
    """Prepare, then load with the layers split evenly over every peer (the solver
    would put a tiny model on one): a topology edited by hand, as users may."""
    topology = cluster.post("/v1/prepare_topology", {"model": str(cluster.model)})
    assert topology.status_code == 200, topology.text
    topo = topology.json()
    devices = {d["peer_id"]: d for d in cluster.get("/v1/devices").json()["data"]}
    ids = sorted(devices)
    n, k = topo["num_layers"], len(ids)
    cuts = [round(i * n / k) for i in range(k + 1)]
    topo["assignments"] = [
        {
            "peer_id": pid,
            "name": devices[pid]["name"],
            "address": devices[pid]["address"],
            "start": cuts[i],
            "end": cuts[i + 1],
            "next_peer_id": ids[i + 1] if i + 1 < k else None,
            "predicted_stage_s": 0.0,
            "predicted_memory_bytes": 0,
            "predicted_load_s": None,
        }
        for i, pid in enumerate(ids)
    ]
    loaded = cluster.post("/v1/load_model", topo)
    assert loaded.status_code == 200, loaded.text
    return loaded.json()


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory) -> Iterator[Cluster]:
    """Two peers, the model split across them, at most 16 requests at once."""
    model = tiny_model(arch="qwen3", layers=4, hidden=64)
    c = start_cluster(tmp_path_factory.mktemp("api"), model, 2, "--max-concurrent", "16")
    try:
        load_split(c)
        yield c
    finally:
        stop_cluster(c)
