"""Models on disk: resolve a reference, read its config and tensor index.

A model is an HF-format directory (``config.json``, safetensors) or a GGUF file
(its metadata implies the config). Nothing here reads tensor data: safetensors
and GGUF headers tell where each tensor lives, so a slice reads only its own.
Imports no mlx (the head opens models too).
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

import attrs

from dnet.errors import InvalidModel, ModelNotFound
from dnet.models.gguf import BLOCKS, GROUP_SIZE, QUANT_BITS, is_gguf, read_header
from dnet.models.gguf_model import hf_name, model_config
from dnet.models.gguf_tokenizer import check_tokenizer
from dnet.models.packaged import find_packaged

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


@attrs.frozen
class TensorInfo:
    """Where a tensor lives and what it is, from a safetensors or GGUF header.

    ``dtype`` is the stored type (``BF16``, ``U32``; GGUF's ``Q4_1``...), ``shape``
    the logical one (a GGUF quantized matrix's weights, not its blocks), ``nbytes``
    what it occupies in memory once loaded, ``offset`` where its bytes start in
    ``file``."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int | None = None


@attrs.frozen
class ModelDir:
    """A readable model: an HF-format directory, or a GGUF file (``format``)."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    format: str = "safetensors"

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
    def is_gguf(self) -> bool:
        return self.format == "gguf"

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def resolve_model(ref: str | Path, hf_cache_dir: Path | None = None) -> Path:
    """Turn a model reference into a local model, never downloading.

    ``ref`` is a packaged model's short name (``smollm2-135m``), a local directory
    (with a ``config.json``, or holding one GGUF file), a ``.gguf`` file, or a
    Hugging Face repo id (``org/name``, or ``org/name/file.gguf`` for one file of a
    repo of several) already in the HF cache (``hf_cache_dir``, else
    huggingface_hub's default; see ``download_model`` for the explicit fetch).
    Returns a directory or a GGUF file.

    Raises:
        ModelNotFound: none of those, or a packaged model whose package is missing.
        InvalidModel: a directory holding several GGUF files and no config.
    """
    packaged = find_packaged(str(ref))
    if packaged is not None:
        return packaged
    path = Path(ref).expanduser()
    if path.is_file():
        if is_gguf(path):
            return path.absolute()  # not resolved: the HF cache links files to hashed blobs
        raise _not_a_model(path)
    if path.is_dir():
        return _model_in(path)
    text = str(ref)
    parts = text.split("/")
    repo_like = not text.startswith((".", "/", "~")) and all(parts)
    if repo_like and (len(parts) == 2 or (len(parts) == 3 and text.endswith(".gguf"))):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        repo = "/".join(parts[:2])
        patterns = [parts[2]] if len(parts) == 3 else None
        try:
            snapshot = Path(
                snapshot_download(
                    repo, local_files_only=True, cache_dir=hf_cache_dir, allow_patterns=patterns
                )
            )
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise ModelNotFound(
                f"{text!r} is not a local directory and not in the Hugging Face cache; "
                f"download it first (scripts/download_model.py {repo})"
            ) from exc
        if len(parts) == 3:
            if not (snapshot / parts[2]).is_file():
                raise ModelNotFound(f"the cached {repo} has no {parts[2]}")
            return snapshot / parts[2]
        try:
            return _model_in(snapshot)
        except InvalidModel as exc:
            raise InvalidModel(f"{exc.message} (as {repo}/FILE.gguf)") from None
    raise _not_a_model(path)


def _not_a_model(path: Path) -> ModelNotFound:
    # One answer whether the path is missing or holds something else: an API
    # caller learns nothing about the head's files.
    return ModelNotFound(
        f"no model at {path}: a model is a directory with config.json and *.safetensors, "
        "a .gguf file, a cached Hugging Face repo id, or smollm2-135m"
    )


def _model_in(path: Path) -> Path:
    """The model a directory holds: itself (``config.json``), or its one GGUF file."""
    if (path / "config.json").is_file():
        return path.resolve()
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return ggufs[0].absolute()
    if not ggufs:
        raise _not_a_model(path)
    shown = ", ".join(p.name for p in ggufs[:6]) + (" ..." if len(ggufs) > 6 else "")
    raise InvalidModel(f"{path} holds {len(ggufs)} GGUF files ({shown}): name one of them")


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """Fetch a model from the Hugging Face hub into its cache: the explicit step that
    ``resolve_model`` never takes on its own."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Read one safetensors file's header (not its data), and check that the data
    it describes is all in the file.

    Raises:
        InvalidModel: the header is not valid, or the file is truncated.
    """
    try:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"its header claims {size} bytes")
            header = json.loads(f.read(size))
            file_size = f.seek(0, 2)
    except (OSError, struct.error, ValueError) as exc:
        raise InvalidModel(f"{file.name} is not a valid safetensors file: {_short(exc)}") from None
    if not isinstance(header, dict):
        raise InvalidModel(
            f"{file.name} is not a valid safetensors file: its header is not an object"
        )
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError):
            raise InvalidModel(f"{file.name}: the header entry of {name!r} is malformed") from None
        if not 0 <= begin <= end or any(d < 0 for d in shape):
            raise InvalidModel(f"{file.name}: the header entry of {name!r} is malformed")
        out[name] = TensorInfo(file, dtype, shape, end - begin, 8 + size + begin)
    data = file_size - 8 - size
    needed = max((t.offset - 8 - size + t.nbytes for t in out.values() if t.offset), default=0)
    if needed > data:
        raise InvalidModel(
            f"{file.name} is truncated: its header describes {needed} bytes of tensors, "
            f"the file holds {max(data, 0)} (an interrupted download?)"
        )
    return out


def _short(exc: Exception) -> str:
    """An error's gist without echoing what it read (a parse position, content)."""
    if isinstance(exc, json.JSONDecodeError):
        return "its header is not valid JSON"
    if isinstance(exc, UnicodeDecodeError):
        return "its header is not text"
    if isinstance(exc, struct.error):
        return "it is shorter than a header"
    return str(exc) if isinstance(exc, ValueError) else type(exc).__name__


def open_model_dir(ref: str | Path, hf_cache_dir: Path | None = None) -> ModelDir:
    """Resolve ``ref`` and read its config and tensor index.

    Raises:
        ModelNotFound: see ``resolve_model``.
        InvalidModel: unreadable config, no weights, or an index naming missing files.
    """
    path = resolve_model(ref, hf_cache_dir)
    if path.is_file():
        return open_gguf(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except OSError:
        raise InvalidModel(f"cannot read {path.name}/config.json") from None
    except ValueError:
        raise InvalidModel(f"{path.name}/config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise InvalidModel(f"{path.name}/config.json is not a JSON object")
    for key in ("model_type", "num_hidden_layers"):
        if key not in config:
            raise InvalidModel(f"{path.name}/config.json has no {key!r}")

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
    check_config(path.name, config, tensors)
    return ModelDir(path, config, tensors)


# Far beyond any released model; a config past them would make every peer allocate
# absurd buffers while it profiles or loads.
CONFIG_LIMITS = {
    "hidden_size": 65536,
    "num_hidden_layers": 1024,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 23,
    "num_attention_heads": 1024,
}


def check_config(name: str, config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Refuse configs no weights could match: sizes past ``CONFIG_LIMITS``, or a
    width or vocabulary other than the embedding table's.

    Raises:
        InvalidModel
    """
    for key, limit in CONFIG_LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
            raise InvalidModel(f"{name}: config.json's {key} is {value!r}, not a size a model has")
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None or embed.dtype not in ("F32", "F16", "BF16") or len(embed.shape) != 2:
        return  # quantized or renamed: its packed shape says less
    vocab, hidden = embed.shape
    for key, value in (("hidden_size", hidden), ("vocab_size", vocab)):
        if config.get(key, value) != value:
            raise InvalidModel(
                f"{name}: config.json's {key} is {config[key]}, but the embedding table "
                f"model.embed_tokens.weight is {vocab} x {hidden}"
            )


def open_gguf(path: Path) -> ModelDir:
    """A GGUF file as a ``ModelDir``: the config its metadata implies, and its
    tensors under their Hugging Face names.

    Raises:
        InvalidModel (a tokenizer dnet cannot build too), UnsupportedTensorType,
        UnsupportedArchitecture
    """
    header = read_header(path)
    config = model_config(header)
    check_tokenizer(header)  # refused here, before any peer loads a layer
    tensors: dict[str, TensorInfo] = {}
    for t in header.tensors.values():
        name = hf_name(t.name)
        if name is None or t.type not in BLOCKS:
            continue  # model_config refused what matters; rope factors are not weights
        tensors[name] = TensorInfo(path, t.type, t.shape, _loaded_nbytes(t.type, t.shape), t.offset)
    return ModelDir(path, config, tensors, format="gguf")


def _loaded_nbytes(kind: str, shape: tuple[int, ...]) -> int:
    """Bytes of an MLX array (packed weights, float16 scales and biases) for a
    GGUF tensor."""
    count = math.prod(shape)
    if kind in QUANT_BITS:
        return count * QUANT_BITS[kind] // 8 + count // GROUP_SIZE * 4
    return count * (4 if kind == "F32" else 2)
