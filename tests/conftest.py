"""Shared fixtures: tiny models made once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dnet.runtime.tiny import TinySpec, ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model(arch=..., dtype=..., ...)``: the path of a tiny model, made on
    first use and shared by the whole session."""
    root = tmp_path_factory.mktemp("tiny-models")

    def get(**fields: object) -> Path:
        return ensure_tiny_model(root, TinySpec(**fields))  # type: ignore[arg-type]

    return get
