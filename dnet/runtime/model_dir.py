"""Model directories: resolve a reference, read ``config.json`` and the tensor index.

Nothing here reads tensor data: safetensors headers tell which file holds which
tensor, so a slice opens only the files it needs.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any

import attrs

from dnet.errors import InvalidModel, ModelNotFound

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


@attrs.frozen
class TensorInfo:
    """Where a tensor lives and what it is, from a safetensors header."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@attrs.frozen
class ModelDir:
    """A readable HF-format model directory."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def resolve_model(ref: str | Path, hf_cache_dir: Path | None = None) -> Path:
    """Turn a model reference into a local directory, never downloading.

    ``ref`` is a local directory, or a Hugging Face repo id (``org/name``) that is
    already in the HF cache (``hf_cache_dir``, else huggingface_hub's default; see
    ``download_model`` for the explicit fetch).

    Raises:
        ModelNotFound: neither a directory with a ``config.json`` nor a cached repo.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} has no config.json; not a model directory")
        return path.resolve()
    text = str(ref)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True, cache_dir=hf_cache_dir))
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise ModelNotFound(
                f"{text!r} is not a local directory and not in the Hugging Face cache; "
                f"download it first (scripts/download_model.py {text})"
            ) from exc
    raise ModelNotFound(f"no model directory at {path}")


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a model from the Hugging Face hub into its cache: the explicit step that
    ``resolve_model`` never takes on its own."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Read one safetensors file's header (not its data).

    Raises:
        InvalidModel: the file is truncated or its header is not valid JSON.
    """
    try:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as exc:
        raise InvalidModel(f"cannot read the safetensors header of {file}: {exc}") from exc
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        out[name] = TensorInfo(file, entry["dtype"], tuple(entry["shape"]), end - begin)
    return out


def open_model_dir(ref: str | Path, hf_cache_dir: Path | None = None) -> ModelDir:
    """Resolve ``ref`` and read its config and tensor index.

    Raises:
        ModelNotFound: see ``resolve_model``.
        InvalidModel: unreadable config, no weights, or an index naming missing files.
    """
    path = resolve_model(ref, hf_cache_dir)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModel(f"cannot read {path / 'config.json'}: {exc}") from exc
    for key in ("model_type", "num_hidden_layers"):
        if key not in config:
            raise InvalidModel(f"{path / 'config.json'} has no {key!r}")

    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidModel(f"cannot read {index}: {exc}") from exc
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise InvalidModel(f"{path} has no model*.safetensors weights")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise InvalidModel(f"{index} names {file.name}, which is missing")
        tensors.update(read_safetensors_header(file))
    return ModelDir(path, config, tensors)
