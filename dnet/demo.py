"""The local demo: two ``dnet-peer`` processes on loopback with a fresh cluster key,
and the model they will share, all stopped when the demo ends.

The default model (SmolLM2-135M-Instruct) fits one peer, and one peer would run it
fastest here, so each demo peer offers a memory budget (``--max-memory``) under
what the whole model needs: the solver has to split it, and says so."""

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
    model: str  # what the head loads: a short name or a path
    peers: tuple[str, ...]
    cluster_key: bytes
    root: Path
    max_memory: int | None  # each peer's budget in bytes


# Each peer offers this share of what the model needs alone (with the embeddings a
# tied head repeats on the last peer): too little to hold it, enough for half.
SPLIT_SHARE = 0.6


def demo_model(model: str | None, cache_dir: Path) -> str:
    """The model the demo loads: ``model``, else the packaged default, else (when
    its package is missing) the tiny random-weight model."""
    from dnet.runtime.packaged import DEFAULT_MODEL, find_packaged

    if model:
        return model
    try:
        find_packaged(DEFAULT_MODEL)
        return DEFAULT_MODEL
    except DnetError as exc:
        from dnet.runtime.tiny import DEMO_SPEC, ensure_tiny_model

        path = ensure_tiny_model(cache_dir / "models", DEMO_SPEC)
        print(
            f"dnet: {exc.message}; using a tiny model of random weights instead (expect "
            f"gibberish): {path}",
            file=sys.stderr,
        )
        return str(path)


def split_budget(model: str, context: int, peers: int) -> int | None:
    """A memory budget per peer that no single peer can hold ``model`` in but
    ``peers`` of them can; None for one peer.

    Raises:
        ModelNotFound, InvalidModel
    """
    from dnet.runtime.model_dir import open_model_dir
    from dnet.runtime.model_profile import model_profile
    from dnet.solver.solve import HEADROOM

    if peers < 2:
        return None
    profile = model_profile(open_model_dir(model))
    whole = profile.slice_memory(0, profile.num_layers, context)
    repeated = profile.embed_bytes if profile.tied_embeddings else 0
    offered = min(SPLIT_SHARE * (whole + repeated) * 2 / peers, 0.95 * whole)
    return int(offered / (1 - HEADROOM)) + 1


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@contextmanager
def open_demo(
    root: Path, cache_dir: Path, peers: int = 2, model: str | None = None, context: int = 4096
) -> Iterator[Demo]:
    """Start ``peers`` daemons, each with a budget that makes them split ``model``
    (default: the packaged SmolLM2) at ``context``; stop them on exit.

    Raises:
        DemoFailed: a peer did not start (its log is named).
        ModelNotFound, InvalidModel: ``model`` is not a model.
    """
    model = demo_model(model, cache_dir)
    budget = split_budget(model, context, peers)
    if budget is not None:
        log.info("each demo peer offers %.0f MiB (--max-memory)", budget / 2**20)
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
                        *(["--max-memory", str(budget)] if budget else []),
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
        yield Demo(model, tuple(addresses), key, root, budget)
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
