"""The local demo: two ``dnet-peer`` processes on loopback with a fresh cluster key,
and the model they will share, all stopped when the demo ends.

The default model (SmolLM2-135M-Instruct) fits one peer, and one peer would run it
fastest here, so each demo peer offers a memory budget (``--max-memory``) under
what the whole model needs: the solver has to split it, and says so."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

from dnet.errors import DnetError
from dnet.peer.process import PeerProcess, PeerStartFailed, stop_all

log = logging.getLogger(__name__)


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
    from dnet.models.packaged import DEFAULT_MODEL, find_packaged

    if model:
        return model
    try:
        find_packaged(DEFAULT_MODEL)
        return DEFAULT_MODEL
    except DnetError as exc:
        path = _tiny_model(cache_dir / "models")
        print(
            f"dnet: {exc.message}; using a tiny model of random weights instead (expect "
            f"gibberish): {path}",
            file=sys.stderr,
        )
        return str(path)


def _tiny_model(root: Path) -> Path:
    """The tiny demo model, made in a child process: making weights takes MLX, which
    the head's process never loads.

    Raises:
        DemoFailed
    """
    made = subprocess.run(
        [sys.executable, "-m", "dnet.runtime.tiny", str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        raise DemoFailed(f"could not make the tiny demo model: {made.stderr.strip()[-2000:]}")
    return Path(made.stdout.strip().splitlines()[-1])


def split_budget(model: str, context: int, peers: int) -> int | None:
    """A memory budget per peer that no single peer can hold ``model`` in but
    ``peers`` of them can; None for one peer.

    Raises:
        ModelNotFound, InvalidModel
    """
    from dnet.models.model_dir import open_model_dir
    from dnet.models.model_profile import model_profile
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
    started: list[PeerProcess] = []
    try:
        for i in range(peers):
            state = root / f"peer{i}"
            state.mkdir(parents=True, exist_ok=True)
            budget_args = ("--max-memory", str(budget)) if budget else ()
            try:
                peer = PeerProcess(
                    state, f"demo-{i}", *budget_args, env=env, log=state / "peer.log"
                )
            except PeerStartFailed:
                raise DemoFailed(f"demo peer {i} did not start; see {state / 'peer.log'}") from None
            started.append(peer)
            log.info("demo peer %d at %s", i, peer.address)
        yield Demo(model, tuple(p.address for p in started), key, root, budget)
    finally:
        stop_all(started)
