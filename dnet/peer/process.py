"""``dnet-peer`` as a child process: start it, read the address it announces, stop
it. The demo, the benchmarks and the tests all start peers through this."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dnet.errors import DnetError

LISTENING = re.compile(r"dnet-peer listening (ws://\S+) peer-id=(\S+)")
STOP_TIMEOUT_S = 10.0


class PeerStartFailed(DnetError):
    code = "peer_start_failed"


def stop_process(proc: subprocess.Popen[str], timeout: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; closes its pipes; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


class PeerProcess:
    """A ``dnet-peer`` child with ``--no-mdns``, started and waited for until it
    announces its address. Its log goes to ``log`` (a file), else to a pipe that
    ``stop`` reads into ``stderr``.

    Raises:
        PeerStartFailed: it exited or printed something else first.
    """

    def __init__(
        self,
        state_dir: Path,
        name: str,
        *args: str,
        key_file: Path | None = None,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        argv = [sys.executable, "-m", "dnet.cli_peer", "--state-dir", str(state_dir)]
        argv += ["--name", name, "--no-mdns", *args]
        if key_file is not None:
            argv += ["--cluster-key-file", str(key_file)]
        self.log = log
        self.stderr = ""
        sink = open(log, "w") if log else None  # noqa: SIM115 (the child holds it)
        try:
            self.proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=sink or subprocess.PIPE,
                text=True,
                env=dict(env if env is not None else os.environ),
            )
        finally:
            if sink is not None:
                sink.close()
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline()
        match = LISTENING.search(self.line)
        if match is None:
            self.stop()
            where = f"see {log}" if log else self.stderr.strip()[-2000:]
            raise PeerStartFailed(f"dnet-peer {name} did not start: {self.line!r}; {where}")
        self.address, self.peer_id = match.group(1), match.group(2)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> int:
        """Stop it (SIGTERM, then SIGKILL); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stderr += self.proc.communicate(timeout=STOP_TIMEOUT_S)[1] or ""
        return stop_process(self.proc)


def stop_all(peers: Sequence[PeerProcess]) -> None:
    """Signal every peer first, so they stop side by side."""
    for p in peers:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    for p in peers:
        p.stop()
