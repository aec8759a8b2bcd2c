"""Daemons started by tests as real processes: ``dnet-peer`` and ``dnet-console``.
Every test that starts one stops it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

CLUSTER_KEY = bytes(range(32))
LINE = re.compile(r"dnet-peer listening (ws://\S+) peer-id=(\S+)")
CONSOLE_LINE = re.compile(r"dnet-console listening (http://\S+) peer-id=(\S+)")


def stop_process(proc: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL after 10 s; closes its pipes; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


class PeerProcess:
    """A ``dnet-peer`` subprocess; always stopped by the test that starts it."""

    def __init__(self, state_dir: Path, key_file: Path, name: str, *extra: str) -> None:
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
                *extra,
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
        return stop_process(self.proc)


class ConsoleProcess:
    """``dnet-console --headless`` on a free loopback port; its log goes to a file
    (a pipe nobody reads would fill and stall it)."""

    def __init__(self, state_dir: Path, key_file: Path, peers: list[str], *extra: str) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = state_dir / "console.log"
        env = dict(os.environ, DNET_LOG_LEVEL="INFO", DNET_WAIT_PEERS="20")
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
