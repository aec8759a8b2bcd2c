"""Embeddings looked up in the model file: a first slice reads the rows of the
tokens it sees, not the whole table.

A vocabulary's table is large (SmolLM2's 8-bit one is a third of the file,
Qwen3-0.6B's a quarter), and a first slice needs only a handful of its rows per
step. The rows come from the file (the page cache, once warm) and go through the
same gather and dequantization as mlx_lm's ``Embedding`` and ``QuantizedEmbedding``,
so the values are the same bits. A last slice whose output head is the tied table
reads all of it every token and keeps it in memory as usual.
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dnet.errors import InvalidModel
from dnet.models.gguf import GROUP_SIZE, QUANT_BITS, stored_nbytes
from dnet.models.model_dir import ModelDir, TensorInfo

PREFIX = "model.embed_tokens."
# safetensors dtypes of embeddings and their quantized parts, as numpy reads them
_NUMPY = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "U32": "<u4", "U8": "<u1"}


class FileEmbedding(nn.Module):
    """``nn.Embedding`` (or ``nn.QuantizedEmbedding``) whose table stays in
    ``model``'s file; ``dtype`` widens what it returns as ``set_dtype`` would."""

    def __init__(self, model: ModelDir, dtype: mx.Dtype | None = None) -> None:
        super().__init__()
        self._infos = {
            name.removeprefix(PREFIX): info
            for name, info in model.tensors.items()
            if name.startswith(PREFIX)
        }
        self._gguf = model.is_gguf
        self._dtype = dtype
        weight = self._infos["weight"]
        self.dims = int(model.config["hidden_size"])
        self._quant: dict[str, Any] | None = None
        if self._gguf and weight.dtype in QUANT_BITS:
            bits = QUANT_BITS[weight.dtype]
            self._quant = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
        elif "scales" in self._infos:  # an MLX-quantized table: its shapes give the format
            groups = self._infos["scales"].shape[-1]
            bits = weight.shape[-1] * 32 // self.dims
            mode = (model.config.get("quantization") or {}).get("mode", "affine")
            self._quant = {"group_size": self.dims // groups, "bits": bits, "mode": mode}

    def __call__(self, ids: mx.array) -> mx.array:
        flat = np.array(ids).reshape(-1)
        unique, inverse = np.unique(flat, return_inverse=True)
        rows = self._rows(unique)
        at = mx.array(inverse.reshape(ids.shape).astype(np.int32))
        if self._quant is None:
            out = rows["weight"][at]
            return out if self._dtype is None else out.astype(self._dtype)
        scales, biases = rows["scales"], rows.get("biases")
        if self._dtype is not None:
            scales = scales.astype(self._dtype)
            biases = biases.astype(self._dtype) if biases is not None else None
        return mx.dequantize(
            rows["weight"][at],
            scales=scales[at],
            biases=biases[at] if biases is not None else None,
            **self._quant,
        )

    def _rows(self, ids: np.ndarray) -> dict[str, mx.array]:
        if self._gguf:
            from dnet.runtime.gguf_tensors import to_mlx

            info = self._infos["weight"]
            raw = self._read(info, ids, stored_nbytes(info.dtype, info.shape[1:]))
            parts = to_mlx("embed.weight", _rows_of(info, len(ids)), raw)
            return {name.rsplit(".", 1)[-1]: array for name, array in parts.items()}
        out = {}
        for part, info in self._infos.items():
            width = info.nbytes // info.shape[0]
            raw = self._read(info, ids, width).view(_NUMPY[info.dtype])
            array = mx.array(raw.reshape(len(ids), *info.shape[1:]))
            out[part] = array.view(mx.bfloat16) if info.dtype == "BF16" else array
        return out

    def _read(self, info: TensorInfo, ids: np.ndarray, width: int) -> np.ndarray:
        """Rows ``ids`` of a tensor, ``width`` bytes each (a few per step: pread)."""
        out = np.empty((len(ids), width), dtype=np.uint8)
        base = info.offset or 0
        with info.file.open("rb") as f:
            for i, token in enumerate(ids.tolist()):
                row = os.pread(f.fileno(), width, base + token * width)
                if len(row) != width:
                    raise InvalidModel(f"{info.file.name} ends inside its embeddings")
                out[i] = np.frombuffer(row, np.uint8)
        return out


def _rows_of(info: TensorInfo, n: int) -> TensorInfo:
    return TensorInfo(info.file, info.dtype, (n, *info.shape[1:]), 0, info.offset)
