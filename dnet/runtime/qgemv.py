"""Decode with quantized weights at memory speed on CPUs: MLX's CPU kernel for
affine-quantized products read SmolLM2's 4-bit layers at ~0.4 GB/s (a 576x576
projection took 0.44 ms a call, 125 of a token's 145 ms). ``native/qgemv.c`` reads
each packed weight once and dequantizes it in registers, for up to 8 rows.

The kernel has three loops: AVX-512 (blocks of 16 words; a 4-bit value's float by
a 16-entry table lookup), AVX2 with FMA and F16C, and a portable one; the best the
CPU has runs. A decode step of a dense llama/qwen slice calls it from C, all layers
in one call (``dnet.runtime.fused``).

``route(module)`` gives a loaded slice's ``QuantizedLinear`` layers (affine mode,
4 or 8 bits, groups of 32, 64 or 128) and a quantized tied embedding used as the
output head ``product``: the kernel for a few rows (decode), float32 tiles through
MLX's float32 product for many (prefill). The kernel runs outside MLX's graph, so
a routed layer evaluates its input first: a decode step syncs once per product.

Only float32 activations take it (GGUF models' norms are float32, and
``--compute-dtype float32`` widens the rest). With bfloat16 or float16 activations
MLX's product rounds each term and the running sum to that type; the kernel sums
in float32, so greedy tokens could differ from mlx_lm's, and those products stay
on MLX.

``configure(cache_dir)`` builds the kernel there (once; needs a C compiler) and
switches it on; ``DNET_QUANT_KERNEL=0`` keeps MLX's own.
"""

from __future__ import annotations

import ctypes
import logging
import math
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from dnet.runtime.blas import build_native

log = logging.getLogger(__name__)

MAX_ROWS = 8
_SOURCE = Path(__file__).parent / "native" / "qgemv.c"
_DECODE = Path(__file__).parent / "native" / "decode.c"  # the fused step (dnet.runtime.fused)
_INT8 = Path(__file__).parent / "native" / "qgemv_int8.c"  # 4-bit by VNNI
_ATTENTION = Path(__file__).parent / "native" / "attention.c"  # the fused step's
_DTYPES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
_lib: Any = None


def configure(cache_dir: Path | None, enabled: bool = True) -> bool:
    """Build and load the kernel (``cache_dir``: where built libraries live); whether
    quantized products now go to it."""
    global _lib
    if not enabled or cache_dir is None:
        _lib = None
        return False
    path = build_native(_SOURCE, cache_dir, ["-lm"], also=(_DECODE, _INT8, _ATTENTION))
    if path is None:
        log.info("no C compiler: quantized products stay on MLX")
        _lib = None
        return False
    lib = ctypes.CDLL(str(path))
    lib.dnet_qgemv.restype = ctypes.c_int
    i, p = ctypes.c_int, ctypes.c_void_p
    lib.dnet_qgemv.argtypes = [i, i, i, p, i, p, p, p, i, i, i, p, i]
    lib.dnet_decode_layers.restype = ctypes.c_int
    lib.dnet_decode_layers.argtypes = [p, p, p, i, i, p, p, p, p, p, p]
    _lib = lib
    return True


def enabled() -> bool:
    return _lib is not None


def library() -> Any:
    """The loaded library (``None`` when products stay on MLX)."""
    return _lib


LOOPS = ("portable", "avx2", "avx512", "vnni")  # the kernel's loops, by level


def use_vectors(level: int) -> None:
    """For tests: run the loop of ``level`` (an index of ``LOOPS``), or the best
    below it that the CPU has."""
    if _lib is not None:
        _lib.dnet_qgemv_use_vectors(int(level))


def vectorized() -> str:
    """The loop the kernel runs here (one of ``LOOPS``)."""
    return LOOPS[_lib.dnet_qgemv_vectorized()] if _lib is not None else "portable"


def _ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def takes(weight: mx.array, scales: mx.array, bits: int, group_size: int, mode: str) -> bool:
    return (
        _lib is not None
        and mode == "affine"
        and bits in (4, 8)
        and group_size in (32, 64, 128)
        and weight.dtype == mx.uint32
        and scales.dtype in _DTYPES
    )


class Packed:
    """A quantized matrix as the kernel reads it: pointers into MLX's own buffers
    (kept alive here), taken once."""

    def __init__(
        self, weight: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int
    ) -> None:
        mx.eval(weight, scales, biases)
        self.arrays = (weight, scales, biases)  # the buffers the pointers point into
        views = [
            np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a) for a in self.arrays
        ]
        if not all(v.flags["C_CONTIGUOUS"] for v in views):
            raise ValueError("the kernel reads contiguous weights only")
        self.views = views
        self.pointers = [_ptr(v) for v in views]
        self.dtype = _DTYPES[scales.dtype]
        self.bits, self.group_size = bits, group_size
        self.n, self.k = weight.shape[0], weight.shape[1] * 32 // bits

    def __call__(self, x: mx.array) -> mx.array:
        """``x @ W.T`` in float32 for ``x`` of at most ``MAX_ROWS`` rows (leading
        dimensions flattened)."""
        rows = math.prod(x.shape[:-1])
        if x.dtype != mx.float32:
            x = x.astype(mx.float32)
        # No new MLX node on the way in or out: an eval that has nothing to run costs
        # nothing, and one that has a reshape to run costs a round trip to MLX's
        # stream thread (~65 us here). The products sharing an input (q, k, v; gate,
        # up) then sync once between them.
        mx.eval(x)
        out = self.on_host(np.asarray(x).reshape(rows, self.k))
        return mx.array(out.reshape(*x.shape[:-1], self.n))

    def on_host(self, xs: np.ndarray) -> np.ndarray:
        """``xs @ W.T`` for float32 rows ``xs`` ``[rows, k]`` (at most ``MAX_ROWS``)
        in host memory, without MLX."""
        rows = xs.shape[0]
        if not xs.flags["C_CONTIGUOUS"] or xs.dtype != np.float32:
            xs = np.ascontiguousarray(xs, dtype=np.float32)
        out = np.empty((rows, self.n), dtype=np.float32)
        w, s, b = self.pointers
        status = _lib.dnet_qgemv(
            rows, self.n, self.k, _ptr(xs), self.k, w, s, b, self.dtype, self.bits,
            self.group_size, _ptr(out), self.n,
        )  # fmt: skip
        if status != 0:
            raise ValueError(f"the quantized kernel refused {rows}x{self.k} by {self.n}x{self.k}")
        return out


def qgemv(
    x: mx.array,
    weight: mx.array,
    scales: mx.array,
    biases: mx.array,
    bits: int,
    group_size: int,
) -> mx.array:
    """``x @ dequantize(weight, scales, biases).T`` for ``x`` of at most ``MAX_ROWS``
    rows (leading dimensions flattened), in float32, by the kernel."""
    return Packed(weight, scales, biases, bits, group_size)(x)


def _packed_for(m: nn.Module) -> Packed:
    """The module's matrix as the kernel reads it, kept on the module (so it goes
    when the module goes: an unloaded slice's weights must not stay alive here)."""
    found: Packed | None = getattr(m, "_dnet_packed", None)
    if found is None or found.arrays[0] is not m["weight"]:
        found = Packed(m["weight"], m["scales"], m["biases"], m.bits, m.group_size)
        object.__setattr__(m, "_dnet_packed", found)
    return found


CHUNKED_ROWS = 32  # up to here the kernel takes 8 rows at a time; above, tiles
TILE_BYTES = 32 << 20  # of float32 weights dequantized at once for a big product


def product(m: nn.Module, x: mx.array) -> mx.array:
    """``x`` times the quantized matrix of ``m`` (transposed), in float32: by the
    kernel for a few rows (in chunks of ``MAX_ROWS`` up to ``CHUNKED_ROWS``); for
    more (prefill), float32 tiles of the matrix dequantized and multiplied by MLX's
    float32 product (OpenBLAS). MLX's own quantized product took 0.35 s for 13 rows
    of a 1536x576 matrix with float16 scales, 14 s for 512; these, 0.5 ms and 7 ms."""
    rows = math.prod(x.shape[:-1])
    packed = _packed_for(m)
    if rows <= MAX_ROWS:
        return packed(x)
    flat = x.reshape(rows, packed.k)
    if rows <= CHUNKED_ROWS:
        parts = [packed(flat[i : i + MAX_ROWS]) for i in range(0, rows, MAX_ROWS)]
        return mx.concatenate(parts, axis=0).reshape(*x.shape[:-1], packed.n)
    flat = flat.astype(mx.float32)
    step = max(1, TILE_BYTES // (4 * packed.k))
    w, s, b = m["weight"], m["scales"], m["biases"]
    tiles = [
        flat
        @ mx.dequantize(
            w[i : i + step],
            s[i : i + step].astype(mx.float32),
            b[i : i + step].astype(mx.float32),
            group_size=m.group_size,
            bits=m.bits,
        ).T
        for i in range(0, packed.n, step)
    ]
    out = tiles[0] if len(tiles) == 1 else mx.concatenate(tiles, axis=-1)
    return out.reshape(*x.shape[:-1], packed.n)


class FastQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` whose products go to ``product``."""

    def __call__(self, x: mx.array) -> mx.array:
        if _lib is None or x.dtype != mx.float32:
            return super().__call__(x)
        out = product(self, x)
        if "bias" in self:
            out = out + self["bias"]
        return out if out.dtype == x.dtype else out.astype(x.dtype)


class FastQuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose output-head products go to ``product``."""

    def as_linear(self, x: mx.array) -> mx.array:
        if _lib is None or x.dtype != mx.float32:
            return super().as_linear(x)
        out = product(self, x)
        return out if out.dtype == x.dtype else out.astype(x.dtype)


def route(module: nn.Module) -> int:
    """Give ``module``'s quantized layers the kernel (see the module's doc); how many."""
    if _lib is None:
        return 0
    routed = 0
    for _, m in module.named_modules():
        mode = getattr(m, "mode", "affine")
        if type(m) is nn.QuantizedLinear and takes(
            m["weight"], m["scales"], m.bits, m.group_size, mode
        ):
            m.__class__ = FastQuantizedLinear
            routed += 1
        elif type(m) is nn.QuantizedEmbedding and takes(
            m["weight"], m["scales"], m.bits, m.group_size, mode
        ):
            m.__class__ = FastQuantizedEmbedding
            routed += 1
    return routed
