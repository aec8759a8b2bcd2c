"""The local demo: the tiny demo model and two ``dnet-peer`` processes on loopback,
with a fresh cluster key, all stopped when the demo ends."""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

from dnet.errors import DnetError

log = logging.getLogger(__name__)

_LINE = re.compile(r"dnet-peer listening (ws://\S+) peer-id=(\S+)")


class DemoFailed(DnetError):
    code = "demo_failed"


@attrs.frozen
class Demo:
    model: Path
    peers: tuple[str, ...]
    cluster_key: bytes
    root: Path


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@contextmanager
def open_demo(root: Path, cache_dir: Path, peers: int = 2) -> Iterator[Demo]:
    """Make (or reuse) the demo model and start ``peers`` daemons; stop them on exit.

    Raises:
        DemoFailed: a peer did not start (its log is named).
    """
    from dnet.runtime.tiny import DEMO_SPEC, ensure_tiny_model

    model = ensure_tiny_model(cache_dir / "models", DEMO_SPEC)
    key = secrets.token_bytes(32)
    env = dict(os.environ, DNET_CLUSTER_KEY=key.hex())
    started: list[subprocess.Popen[str]] = []
    addresses: list[str] = []
    try:
        for i in range(peers):
            state = root / f"peer{i}"
            state.mkdir(parents=True, exist_ok=True)
            log_path = state / "peer.log"
            with log_path.open("w") as peer_log:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "dnet.cli_peer",
                        "--no-mdns",
                        "--name",
                        f"demo-{i}",
                        "--state-dir",
                        str(state),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=peer_log,
                    text=True,
                    env=env,
                )
            started.append(proc)
            assert proc.stdout is not None
            match = _LINE.search(proc.stdout.readline())
            if match is None:
                raise DemoFailed(f"demo peer {i} did not start; see {log_path}")
            addresses.append(match.group(1))
            log.info("demo peer %d at %s", i, match.group(1))
        yield Demo(model, tuple(addresses), key, root)
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
