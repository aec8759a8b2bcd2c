"""GGUF tensor data as MLX arrays: only the tensors asked for, read from their
byte ranges.

``mx.load`` reads GGUF files too, but all of a file at once; a peer holding a
few layers reads just theirs here. Quantized blocks become MLX's affine layout
(packed weights, float16 scales and biases per 32 weights) with the same bits
``mx.load`` gives, which the tests check:

- Q4_0: 32 4-bit codes q and a scale d; w = d * (q - 8).
- Q4_1: 32 4-bit codes, a scale d and a minimum m; w = d * q + m.
- Q8_0: 32 signed bytes q and a scale d; w = d * q = d * (q + 128) - 128 d.

GGML keeps a block's first 16 weights in the low nibbles of its 16 bytes and the
last 16 in the high ones; MLX packs weight j of a row at bits 4 * (j % 8) of
word j // 8, so the nibbles are regrouped in pairs.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from dnet.errors import InvalidModel
from dnet.models.gguf import BLOCKS, FLOAT_DTYPES, stored_nbytes
from dnet.models.gguf_model import PERMUTED_QK
from dnet.models.model_dir import ModelDir, TensorInfo


def read_tensors(model: ModelDir, names: list[str]) -> dict[str, mx.array]:
    """The named tensors (Hugging Face names) of a GGUF ``model`` as MLX arrays,
    with ``.scales`` and ``.biases`` beside each quantized weight.

    Raises:
        InvalidModel: the file is shorter than its header says.
    """
    out: dict[str, mx.array] = {}
    permute = model.config["model_type"] in PERMUTED_QK
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(model.tensors[name].file, []).append(name)
    for file, file_names in by_file.items():
        with file.open("rb") as f:
            for name in sorted(file_names, key=lambda n: model.tensors[n].offset or 0):
                info = model.tensors[name]
                raw = _read(f, info)
                heads = _rope_heads(model.config, name) if permute else None
                if heads is not None:
                    raw = unpermute_rows(raw, heads)
                out.update(to_mlx(name, info, raw))
    return out


def _read(f: object, info: TensorInfo) -> np.ndarray:
    """The tensor's stored bytes as a [rows, bytes per row] array."""
    nbytes = stored_nbytes(info.dtype, info.shape)
    raw = np.empty(nbytes, dtype=np.uint8)
    f.seek(info.offset or 0)  # type: ignore[attr-defined]
    if f.readinto(raw) != nbytes:  # type: ignore[attr-defined]
        raise InvalidModel(f"{info.file.name} ends inside a tensor: the file is truncated")
    if len(info.shape) == 1 and info.dtype in FLOAT_DTYPES:
        return raw.reshape(info.shape[0], -1)  # a vector: one row per value
    return raw.reshape(math.prod(info.shape[:-1]), -1)


def _rope_heads(config: dict, name: str) -> int | None:
    """How many heads' rows llama.cpp permuted in this tensor (Q: attention heads,
    K: key-value heads); None for every other tensor."""
    if ".self_attn.q_proj." in name:
        return int(config["num_attention_heads"])
    if ".self_attn.k_proj." in name:
        return int(config["num_key_value_heads"])
    return None


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary reordering of Q or K rows (``rows``: one per output).

    Its converter stores, within each head of dimension d, row 2i + j of the file
    as row j * d/2 + i of Hugging Face's layout (j in {0, 1}): the interleaved pairs
    of its "normal" rotary mode instead of the half split of Hugging Face's (and
    mlx_lm's default). Quantized rows move whole, their blocks untouched.
    """
    n = rows.shape[0]
    if n % (2 * heads):
        raise InvalidModel(f"{n} rows cannot be {heads} heads of rotary pairs")
    half = n // heads // 2
    order = np.arange(n).reshape(heads, half, 2).transpose(0, 2, 1).reshape(-1)
    return rows[order]


def to_mlx(name: str, info: TensorInfo, raw: np.ndarray) -> dict[str, mx.array]:
    """A tensor's stored rows (``raw``: [rows, bytes per row]) as MLX arrays: the
    weight, and for quantized types its ``.scales`` and ``.biases``."""
    kind, shape = info.dtype, info.shape
    if kind == "F32":
        return {name: mx.array(raw.view("<f4").reshape(shape))}
    if kind == "F16":
        return {name: mx.array(raw.view("<f2").reshape(shape))}
    if kind == "BF16":
        return {name: mx.array(raw.view("<u2").reshape(shape)).view(mx.bfloat16)}
    block_bytes = BLOCKS[kind][1]
    blocks = raw.reshape(raw.shape[0], -1, block_bytes)
    scales = np.ascontiguousarray(blocks[:, :, 0:2]).view("<f2")[:, :, 0]
    if kind == "Q8_0":
        codes = blocks[:, :, 2:] ^ np.uint8(0x80)  # signed -> offset by 128
        biases = (scales.astype(np.float32) * -128).astype(np.float16)
    else:
        start = 2 if kind == "Q4_0" else 4
        nibbles = blocks[:, :, start : start + 16]
        low, high = nibbles & np.uint8(0x0F), nibbles >> np.uint8(4)
        codes = np.concatenate(
            [low[:, :, 0::2] | (low[:, :, 1::2] << np.uint8(4)),
             high[:, :, 0::2] | (high[:, :, 1::2] << np.uint8(4))],
            axis=2,
        )  # fmt: skip
        if kind == "Q4_0":
            biases = (scales.astype(np.float32) * -8).astype(np.float16)
        else:
            biases = np.ascontiguousarray(blocks[:, :, 2:4]).view("<f2")[:, :, 0]
    lead = shape[:-1]
    packed = np.ascontiguousarray(codes).reshape(*lead, -1).view("<u4")
    stem = name.removesuffix(".weight")
    return {
        name: mx.array(packed),
        f"{stem}.scales": mx.array(scales.reshape(*lead, -1)),
        f"{stem}.biases": mx.array(np.ascontiguousarray(biases).reshape(*lead, -1)),
    }
