"""Daemons started by tests: ``dnet-peer`` and ``dnet-console`` as real processes,
and peer daemons inside the test's own Trio run. Every test that starts one stops
it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from dnet.identity import Identity
from dnet.peer import process
from dnet.peer.daemon import PeerDaemon
from dnet.peer.process import stop_process
from dnet.runtime.compute import open_compute_thread

__all__ = [
    "CONSOLE_LINE",
    "LINE",
    "ConsoleProcess",
    "PeerProcess",
    "open_peers",
    "stop_process",
]

CLUSTER_KEY = bytes(range(32))
LINE = process.LISTENING
CONSOLE_LINE = re.compile(r"dnet-console listening (http://\S+) peer-id=(\S+)")


class PeerProcess(process.PeerProcess):
    """A ``dnet-peer`` subprocess with the test cluster's key file; always stopped
    by the test that starts it."""

    def __init__(
        self,
        state_dir: Path,
        key_file: Path,
        name: str,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        env = dict(os.environ, DNET_OPENBLAS="0", DNET_LOG_LEVEL="WARNING", **(env or {}))
        super().__init__(state_dir, name, *extra, key_file=key_file, env=env)


class ConsoleProcess:
    """``dnet-console --headless`` on a free loopback port; its log goes to a file
    (a pipe nobody reads would fill and stall it)."""

    def __init__(
        self,
        state_dir: Path,
        key_file: Path,
        peers: list[str],
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = state_dir / "console.log"
        env = dict(os.environ, DNET_LOG_LEVEL="INFO", DNET_WAIT_PEERS="20", **(env or {}))
        args = [sys.executable, "-m", "dnet.cli_console", "--headless", "--no-mdns"]
        args += ["--http-port", "0", "--state-dir", str(state_dir)]
        args += ["--cluster-key-file", str(key_file)]
        for p in peers:
            args += ["--peer", p]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [*args, *extra], stdout=subprocess.PIPE, stderr=log, text=True, env=env
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = CONSOLE_LINE.search(line)
        if not match:
            self.stop()
            raise RuntimeError(f"dnet-console did not start: {line!r}\n{self.log()}")
        self.url = match.group(1)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        return stop_process(self.proc)


@asynccontextmanager
async def open_peers(
    n: int,
    *,
    key: bytes = CLUSTER_KEY,
    idle_timeout: float = 600.0,
    max_memory: int | None = None,
    max_disk: int | None = None,
) -> AsyncIterator[list[tuple[str, PeerDaemon]]]:
    """``n`` peer daemons in this Trio process, each with its own compute thread
    (and ``max_memory``, their ``--max-memory``)."""
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        peers = []
        for i in range(n):
            compute = await stack.enter_async_context(open_compute_thread(f"compute-{i}"))
            daemon = PeerDaemon(
                Identity.generate(),
                key,
                compute,
                name=f"p{i}",
                request_idle_timeout_s=idle_timeout,
                max_memory=max_memory,
                max_disk=max_disk,
            )
            port = await nursery.start(daemon.run, "127.0.0.1", 0)
            peers.append((f"ws://127.0.0.1:{port}/dnet/2", daemon))
        try:
            yield peers
        finally:
            nursery.cancel_scope.cancel()
