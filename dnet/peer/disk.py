"""The disk a peer's weight store takes: each model's directory (``<root>/<id>``)
counts the blocks its files hold (sparse files only what arrived; links to local
copies nothing), and ``--max-disk`` is kept by evicting the models used least
recently, never the one being loaded. ``dnet-peer models`` lists and removes them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import attrs

from dnet.errors import OverDiskBudget

USED = "used"  # a file whose modification time is the model's last load


@attrs.frozen
class StoredModel:
    model_id: str
    disk_bytes: int  # blocks held
    spans: int  # verified spans
    files: tuple[str, ...]
    last_used: float  # seconds since the epoch


def disk_bytes(directory: Path) -> int:
    total = 0
    for path in directory.iterdir():
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_blocks * 512
    return total


def stored_models(root: Path) -> list[StoredModel]:
    """The models under ``root``, least recently used first."""
    models: list[StoredModel] = []
    if not root.is_dir():
        return models
    for directory in root.iterdir():
        if not (directory / "have.json").is_file():
            continue
        try:
            spans = len(json.loads((directory / "have.json").read_text()))
        except (OSError, ValueError):
            spans = 0
        used = directory / USED
        files = tuple(
            sorted(p.name for p in directory.iterdir() if p.name not in (USED, "have.json"))
        )
        models.append(
            StoredModel(
                directory.name,
                disk_bytes(directory),
                spans,
                files,
                (used if used.exists() else directory).stat().st_mtime,
            )
        )
    return sorted(models, key=lambda m: m.last_used)


def touch(root: Path, model_id: str) -> None:
    used = root / model_id / USED
    used.parent.mkdir(parents=True, exist_ok=True)
    used.touch()
    now = time.time()
    os.utime(used, (now, now))


def remove(root: Path, model_id: str) -> bool:
    directory = root / model_id
    if not (directory / "have.json").is_file() or directory.parent != root:
        return False
    shutil.rmtree(directory)
    return True


def make_room(root: Path, model_id: str, need: int, max_disk: int) -> list[str]:
    """Evict models other than ``model_id``, least recently used first, until
    ``need`` more bytes fit under ``max_disk`` beside what ``model_id`` already
    holds; the ids evicted.

    Raises:
        OverDiskBudget: it would not fit with every other model gone.
    """
    touch(root, model_id)
    if need > max_disk:
        raise OverDiskBudget(
            f"the slice's weights take {need / 2**20:.0f} MiB, more than this peer's "
            f"--max-disk of {max_disk / 2**20:.0f} MiB"
        )
    models = stored_models(root)
    mine = next((m.disk_bytes for m in models if m.model_id == model_id), 0)
    others = [m for m in models if m.model_id != model_id]
    used = sum(m.disk_bytes for m in others) + max(mine, need)
    evicted = []
    for m in others:
        if used <= max_disk:
            break
        if remove(root, m.model_id):
            used -= m.disk_bytes
            evicted.append(m.model_id)
    return evicted
