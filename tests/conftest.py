"""Shared fixtures: tiny models made once per test session, and peer processes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dnet.runtime.tiny import TinySpec, ensure_tiny_model

from .processes import CLUSTER_KEY, PeerProcess

# Nothing in a test reaches the real hub: a repo id that is not a stand-in's goes to
# a closed loopback port (and is refused at once), here and in every child process.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model(arch=..., dtype=..., ...)``: the path of a tiny model, made on
    first use and shared by the whole session."""
    root = tmp_path_factory.mktemp("tiny-models")

    def get(**fields: object) -> Path:
        return ensure_tiny_model(root, TinySpec(**fields))  # type: ignore[arg-type]

    return get


@pytest.fixture
def peer_processes(tmp_path):
    """``peer_processes(n)``: start ``n`` more ``dnet-peer`` processes on the test
    cluster's key; all stopped after the test."""
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
