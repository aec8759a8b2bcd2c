"""Fixtures for rings of peers over real loopback WebSockets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio

from dnet.identity import Identity
from dnet.peer.daemon import PeerDaemon
from dnet.runtime.compute import open_compute_thread

CLUSTER_KEY = bytes(range(32))
LINE = re.compile(r"dnet-peer listening (ws://\S+) peer-id=(\S+)")


@asynccontextmanager
async def open_peers(
    n: int, *, key: bytes = CLUSTER_KEY, idle_timeout: float = 600.0
) -> AsyncIterator[list[tuple[str, PeerDaemon]]]:
    """``n`` peer daemons in this Trio process, each with its own compute thread."""
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        peers = []
        for i in range(n):
            compute = await stack.enter_async_context(open_compute_thread(f"compute-{i}"))
            daemon = PeerDaemon(
                Identity.generate(), key, compute, name=f"p{i}", request_idle_timeout_s=idle_timeout
            )
            port = await nursery.start(daemon.run, "127.0.0.1", 0)
            peers.append((f"ws://127.0.0.1:{port}/dnet/1", daemon))
        try:
            yield peers
        finally:
            nursery.cancel_scope.cancel()


class PeerProcess:
    """A ``dnet-peer`` subprocess; always stopped by the test that starts it."""

    def __init__(self, state_dir: Path, key_file: Path, name: str) -> None:
        env = dict(os.environ, DNET_OPENBLAS="0", DNET_LOG_LEVEL="WARNING")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dnet.cli_peer",
                "--state-dir",
                str(state_dir),
                "--cluster-key-file",
                str(key_file),
                "--name",
                name,
                "--no-mdns",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = LINE.search(line)
        if not match:
            self.stop()
            raise RuntimeError(
                f"dnet-peer did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        self.address, self.peer_id = match.group(1), match.group(2)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode


@pytest.fixture
def peer_processes(tmp_path):
    started: list[PeerProcess] = []
    key_file = tmp_path / "cluster.key"
    key_file.write_text(CLUSTER_KEY.hex())

    def start(n: int) -> list[PeerProcess]:
        for _i in range(n):
            started.append(
                PeerProcess(tmp_path / f"state{len(started)}", key_file, f"sp{len(started)}")
            )
        return started[-n:]

    yield start
    for p in started:
        p.stop()
