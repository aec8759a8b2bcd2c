"""GGUF files: the header (metadata and tensor index), read without the tensors.

The format (llama.cpp's ``gguf`` spec, versions 2 and 3): magic, version, counts,
typed key-value metadata, then one record per tensor (name, dims innermost first,
type, offset), then the aligned tensor data. ``gguf.GGUFReader`` (llama.cpp's own
Python package) reads the same, but it turns every metadata string into numpy
views: 2.1 s and ~175 MB for SmolLM2's 98k vocabulary strings, on every peer.
This reader walks the header through a memory map, decodes the vocabulary only
when asked (the head's tokenizer), and touches no tensor data. The tests check it
against ``GGUFReader`` on the same files.

Imports no mlx: the head reads headers too.
"""

from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from dnet.errors import InvalidModel

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGML tensor types by number (ggml.h); what dnet loads is in BLOCKS.
TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}  # fmt: skip
# (elements per block, bytes per block) of the types dnet turns into MLX arrays.
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q8_0": (32, 34),
}
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
GROUP_SIZE = 32  # every supported quantized type scales blocks of 32 weights
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# Metadata value types: struct formats of the scalars, numpy dtypes of their arrays.
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip
_MAX_COUNT = 1 << 24  # key-value pairs, tensors, array items: far beyond real files
_MAX_DIMS = 4

# String arrays decoded only on request: the vocabulary and its merges.
VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")


@attrs.frozen
class Skipped:
    """A string array left undecoded (see ``read_header(vocab=...)``)."""

    count: int


@attrs.frozen
class GGUFTensor:
    """One tensor's record: ``shape`` in numpy order (rows first), ``offset`` from
    the start of the file, ``nbytes`` as stored (0 for a type dnet cannot load)."""

    name: str
    type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@attrs.frozen
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts like a GGUF file."""
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def stored_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of a supported type occupies in the file.

    Raises:
        InvalidModel: the rows are not a whole number of blocks.
    """
    per_block, block_bytes = BLOCKS[type_name]
    if shape and shape[-1] % per_block:
        raise InvalidModel(f"a {type_name} tensor's rows of {shape[-1]} are not whole blocks")
    return math.prod(shape) // per_block * block_bytes


class _Cursor:
    """Reads little-endian values from a memory-mapped header, bounds-checked."""

    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf = buf
        self.pos = 0
        self.data_start = 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def count(self, what: str) -> int:
        n = int(self.take("<Q"))
        if n > _MAX_COUNT:
            raise ValueError(f"{n} {what} is more than any GGUF file holds")
        return n

    def string(self) -> str:
        n = int(self.take("<Q"))
        end = self.pos + n
        if end > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        text = self.buf[self.pos : end].decode("utf-8")
        self.pos = end
        return text

    def skip_string(self) -> None:
        n = int(self.take("<Q"))
        self.pos += n
        if self.pos > len(self.buf):
            raise ValueError("a string runs past the end of the file")

    def value(self, kind: int, decode: bool) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = int(self.take("<I")), self.count("array items")
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                end = self.pos + n * dtype.itemsize
                if end > len(self.buf):
                    raise ValueError("an array runs past the end of the file")
                out = np.frombuffer(self.buf, dtype, n, self.pos).copy()
                self.pos = end
                return out
            if item == _STRING and not decode:
                for _ in range(n):
                    self.skip_string()
                return Skipped(n)
            return [self.value(item, decode) for _ in range(n)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.take(_SCALARS[kind])


def read_header(path: str | Path, *, vocab: bool = False) -> GGUFHeader:
    """The metadata and tensor records of a GGUF file. The vocabulary's string
    arrays (``VOCAB_KEYS``) are decoded only with ``vocab=True``; other string
    arrays always.

    Raises:
        InvalidModel: not a GGUF file, an unsupported version, or a malformed or
            truncated header.
    """
    path = Path(path)
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(path, _Cursor(buf), vocab)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise InvalidModel(f"cannot read the GGUF header of {path.name}: {exc}") from exc


def header_end(prefix: bytes) -> int | None:
    """Where a GGUF file's tensor data begins, read from a ``prefix`` of the file;
    None when the prefix is too short to hold the whole header.

    Raises:
        InvalidModel: the prefix is not the start of a GGUF file dnet reads.
    """
    if len(prefix) < 24:  # magic, version and the two counts
        return None
    cur = _Cursor(prefix)
    try:
        _parse(Path("prefix"), cur, vocab=False, sized=False)
    except (struct.error, IndexError):
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        if "past the end" in str(exc):
            return None
        raise InvalidModel(f"cannot read a GGUF header: {exc}") from exc
    return cur.data_start


def _parse(path: Path, cur: _Cursor, vocab: bool, sized: bool = True) -> GGUFHeader:
    if cur.buf[:4] != MAGIC:
        raise ValueError("not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (dnet reads versions 2 and 3, little-endian)")
    n_tensors = cur.count("tensors")
    n_kv = cur.count("metadata entries")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        kind = cur.take("<I")
        metadata[key] = cur.value(kind, decode=vocab or key not in VOCAB_KEYS)
    records = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = [cur.take("<Q") for _ in range(n_dims)]
        records.append((name, tuple(reversed(dims)), cur.take("<I"), cur.take("<Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment {alignment} is not a power of two")
    data_start = cur.data_start = -(-cur.pos // alignment) * alignment
    size = len(cur.buf) if sized else 1 << 62
    tensors: dict[str, GGUFTensor] = {}
    for name, shape, type_id, offset in records:
        type_name = TYPE_NAMES.get(type_id, f"type {type_id}")
        if any(d <= 0 for d in shape):
            raise ValueError(f"tensor {name} has shape {shape}")
        nbytes = stored_nbytes(type_name, shape) if type_name in BLOCKS else 0
        start = data_start + offset
        if start + nbytes > size:
            raise ValueError(
                f"tensor {name} ends at byte {start + nbytes}, past the end of the "
                f"file ({size} bytes): the file is truncated"
            )
        tensors[name] = GGUFTensor(name, type_name, shape, start, nbytes)
    return GGUFHeader(path, version, metadata, tensors)
