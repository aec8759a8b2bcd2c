"""A slice's decode step in one call to C (``native/decode.c``): all its layers for
a few rows, without MLX between them (and a short prefill chunk of one request the
same way, causal within the chunk).

With the quantized kernel, a decode step's weights took 28 of its ~70 ms at the
Qwen3-0.6B shape; the rest was MLX: every product outside MLX's graph costs a sync
(~65 us here) and each of a layer's ~30 small operations ~3 us, with Python's calls
around them. ``FusedDecode`` runs the dense llama/qwen2/qwen3 layer (RMS norms,
q/k norms, rotary, attention over the cache, SwiGLU MLP) in C, calling the same
quantized products.

It keeps what MLX would keep: the keys and values go into mlx_lm's own ``KVCache``
or ``BatchKVCache`` arrays, so that prefill (MLX) and decode (here) share a cache,
and a step here leaves the cache as a step by MLX would. Rotary angles come from
the layer's own rope module, applied once per 256 positions to a unit pattern, so
they are MLX's angles for every rope variant it implements.

``FusedDecode.plan(layers)`` says whether the layers qualify: float32 activations,
every projection routed to the quantized kernel, and a block of a known family
(see ``_FAMILIES``); anything else runs on MLX as before.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from dnet.runtime import qgemv

# mlx_lm modules whose decoder block is exactly: h = x + attn(rms(x)); h + mlp(rms(h)),
# with SwiGLU and (qwen3) RMS norms of q and k per head.
_FAMILIES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")
_ROPES = ("RoPE", "Llama3RoPE")  # mx.fast.rope and nothing else around it
_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
TABLE = 256  # positions of rotary angles made at once

_p = ctypes.c_void_p


class _Matrix(ctypes.Structure):
    _fields_ = [
        ("w", _p), ("scales", _p), ("biases", _p), ("bias", _p),
        ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("dtype", ctypes.c_int32),
        ("bits", ctypes.c_int32), ("group", ctypes.c_int32), ("pad", ctypes.c_int32),
    ]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [
        ("attn_norm", _p), ("mlp_norm", _p), ("q_norm", _p), ("k_norm", _p),
        *((name, _Matrix) for name in _PROJECTIONS),
    ]  # fmt: skip


class _Shape(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int32) for name in (
            "hidden", "heads", "kv_heads", "head_dim", "inter", "rope_dims",
            "rope_traditional", "pad",
        )),
        *((name, ctypes.c_float) for name in ("eps", "qk_eps", "scale", "pad2")),
    ]  # fmt: skip


class _KV(ctypes.Structure):
    _fields_ = [
        ("keys", _p), ("values", _p),
        *((name, ctypes.c_int64) for name in ("kb", "kh", "kt", "vb", "vh", "vt")),
    ]  # fmt: skip


def _modules(layer: nn.Module) -> dict[str, nn.Module] | None:
    """The parts of a decoder block the fused step reads, or None if it is not one."""
    if type(layer).__module__ not in _FAMILIES:
        return None
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return None
    parts: dict[str, Any] = {
        "attn_norm": getattr(layer, "input_layernorm", None),
        "mlp_norm": getattr(layer, "post_attention_layernorm", None),
        "q_norm": getattr(attn, "q_norm", None),
        "k_norm": getattr(attn, "k_norm", None),
        "rope": getattr(attn, "rope", None),
        **{n: getattr(attn, f"{n}_proj", None) for n in "qkvo"},
        **{n: getattr(mlp, f"{n}_proj", None) for n in ("gate", "up", "down")},
    }
    if type(parts["rope"]).__name__ not in _ROPES:
        return None
    if any(type(parts[n]) is not qgemv.FastQuantizedLinear for n in _PROJECTIONS):
        return None
    if "bias" in parts["o"] or any("bias" in parts[n] for n in ("gate", "up", "down")):
        return None
    for n in ("attn_norm", "mlp_norm", "q_norm", "k_norm"):
        m = parts[n]
        if type(m) is not nn.RMSNorm and not (m is None and n in ("q_norm", "k_norm")):
            return None
    return parts


class _Plan:
    """One layer's C view: its struct and the arrays its pointers point into."""

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        self.keep: list[Any] = []
        fields: dict[str, Any] = {}
        for n in ("attn_norm", "mlp_norm", "q_norm", "k_norm"):
            m = parts[n]
            fields[n] = None if m is None else self._floats(m.weight)
        for n in _PROJECTIONS:
            m = parts[n]
            packed = qgemv._packed_for(m)
            self.keep.append(packed)
            w, s, b = packed.pointers
            bias = self._floats(m["bias"]) if "bias" in m else None
            fields[n] = _Matrix(
                w, s, b, bias, packed.n, packed.k, packed.dtype, packed.bits, packed.group_size, 0
            )
        self.struct = _Layer(**fields)

    def _floats(self, a: mx.array) -> int:
        view = np.ascontiguousarray(np.asarray(a.astype(mx.float32)), dtype=np.float32)
        self.keep.append(view)
        return int(view.ctypes.data)


class _Rope:
    """Cosines and sines of a rope module's angles, by position, computed by the
    module itself (rotating a unit pattern) ``TABLE`` positions at a time."""

    def __init__(self, rope: nn.Module, head_dim: int) -> None:
        self.rope, self.dims, self.traditional = rope, int(rope.dims), bool(rope.traditional)
        half = self.dims // 2
        pattern = np.zeros(head_dim, dtype=np.float32)
        if self.traditional:
            self.cos_at, self.sin_at = np.arange(0, self.dims, 2), np.arange(1, self.dims, 2)
        else:
            self.cos_at, self.sin_at = np.arange(half), np.arange(half, self.dims)
        pattern[self.cos_at] = 1.0
        self.pattern = mx.array(np.broadcast_to(pattern, (1, 1, TABLE, head_dim)).copy())
        self.chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        found = self.chunks.get(c)
        if found is None:
            out = np.array(self.rope(self.pattern, offset=c * TABLE))[0, 0]
            found = (
                np.ascontiguousarray(out[:, self.cos_at]),
                np.ascontiguousarray(out[:, self.sin_at]),
            )
            self.chunks[c] = found
        return found

    def rows(self, positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
        cos = np.empty((len(positions), self.dims // 2), dtype=np.float32)
        sin = np.empty_like(cos)
        for r, pos in enumerate(positions):
            c, i = divmod(pos, TABLE)
            table = self._chunk(c)
            cos[r], sin[r] = table[0][i], table[1][i]
        return cos, sin


def _strides(a: np.ndarray) -> tuple[int, int, int]:
    return a.strides[0] // 4, a.strides[1] // 4, a.strides[2] // 4


class FusedDecode:
    """A slice's layers as one C call per decode step. Use ``plan``."""

    def __init__(self, layers: list[nn.Module], parts: list[dict[str, nn.Module]]) -> None:
        attn = layers[0].self_attn
        first = parts[0]
        self.plans = [_Plan(p) for p in parts]
        self.layers = (_Layer * len(layers))(*(p.struct for p in self.plans))
        self.head_dim = qgemv._packed_for(first["q"]).n // int(attn.n_heads)
        self.kv_heads = int(attn.n_kv_heads)
        self.rope = _Rope(first["rope"], self.head_dim)
        qk_norm = first["q_norm"]
        self.shape = _Shape(
            hidden=qgemv._packed_for(first["q"]).k,
            heads=int(attn.n_heads),
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            inter=qgemv._packed_for(first["gate"]).n,
            rope_dims=self.rope.dims,
            rope_traditional=int(self.rope.traditional),
            eps=float(first["attn_norm"].eps),
            qk_eps=float(qk_norm.eps) if qk_norm is not None else 0.0,
            scale=float(attn.scale),
        )

    @classmethod
    def plan(cls, layers: list[nn.Module]) -> FusedDecode | None:
        """The fused step for ``layers``, or None when they do not all qualify."""
        if qgemv.library() is None or not layers:
            return None
        parts = [_modules(layer) for layer in layers]
        checked = [p for p in parts if p is not None]
        if len(checked) < len(layers):
            return None
        if any(layer.input_layernorm.weight.dtype != mx.float32 for layer in layers):
            return None
        # One shape and one rope for every layer: the C step takes them once.
        first = checked[0]
        for p in checked[1:]:
            if (
                repr(p["rope"]) != repr(first["rope"])
                or p["attn_norm"].eps != first["attn_norm"].eps
            ):
                return None
        return cls(layers, checked)

    def __call__(self, h: mx.array | np.ndarray, caches: list[Any]) -> np.ndarray | None:
        """Hidden states ``[batch, tokens, hidden]`` through every layer (returned
        as ``[batch * tokens, hidden]`` on the host): a decode step of one or more
        requests (one token each), or a short prefill chunk of one request. None
        when the caches are of a kind this does not write, or the input is neither
        (the caller runs MLX's layers)."""
        where = _places(caches[0], h.shape[0], h.shape[1])
        if where is None:
            return None
        batch, slots, first, positions = where
        most = max(slots)
        kv = (_KV * len(caches))(*(self._own(c, most, h.shape[0]) for c in caches))
        if isinstance(h, np.ndarray):
            x = np.ascontiguousarray(h, dtype=np.float32).reshape(len(positions), -1)
        else:
            x = np.array(h.astype(mx.float32) if h.dtype != mx.float32 else h, dtype=np.float32)
            x = np.ascontiguousarray(x.reshape(len(positions), -1))
        cos, sin = self.rope.rows(positions)
        rows = [np.asarray(a, dtype=np.int32) for a in (batch, slots, first)]
        status = qgemv.library().dnet_decode_layers(
            ctypes.byref(self.shape), self.layers, kv, len(caches), len(positions),
            x.ctypes.data, *(a.ctypes.data for a in rows), cos.ctypes.data, sin.ctypes.data,
        )  # fmt: skip
        if status != 0:
            raise ValueError("the fused decode step refused its arguments")
        _advance(caches, h.shape[1], positions)
        return x

    def _own(self, c: Any, slot: int, rows: int) -> _KV:
        """The cache's arrays as the step writes them: arrays of its own (copied
        once from what MLX left), with room for slot ``slot``."""
        owned = getattr(c, "_dnet_kv", None)
        if owned is not None and owned[0] is c.keys and slot < c.keys.shape[2]:
            return owned[2]
        capacity = math.ceil((slot + 1) / KVCache.step) * KVCache.step
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        keys, values = mx.zeros(shape, dtype=mx.float32), mx.zeros(shape, dtype=mx.float32)
        mx.eval(keys, values)
        k, v = np.asarray(keys), np.asarray(values)
        if c.keys is not None and slot > 0:
            k[:, :, :slot] = np.asarray(c.keys[..., :slot, :].astype(mx.float32))
            v[:, :, :slot] = np.asarray(c.values[..., :slot, :].astype(mx.float32))
        c.keys, c.values = keys, values
        struct = _KV(int(k.ctypes.data), int(v.ctypes.data), *_strides(k), *_strides(v))
        c._dnet_kv = (keys, values, struct)
        return struct


def embed_on_host(embed: nn.Module, ids: mx.array) -> np.ndarray | None:
    """The first slice's hidden states for token ids ``ids`` ``[batch, tokens]``
    from a quantized table, on the host and in float32: bit for bit MLX's
    ``dequantize``, which computes ``scale * q + bias`` in the scales' type (numpy's
    float16 products and sums round as MLX's do; checked on 20,000 rows of the
    0.6B shape's table). MLX took ~0.3 ms a step for it (a sync with its stream).
    None for other tables, and for bfloat16 scales (numpy has none)."""
    if type(embed) not in (qgemv.FastQuantizedEmbedding, nn.QuantizedEmbedding):
        return None
    if getattr(embed, "mode", "affine") != "affine" or embed["scales"].dtype not in (
        mx.float16,
        mx.float32,
    ):
        return None
    w, scales, biases = qgemv._packed_for(embed).views
    flat = np.asarray(ids).reshape(-1)
    bits, group = int(embed.bits), int(embed.group_size)
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    q = (w[flat][:, :, None] >> shifts) & np.uint32((1 << bits) - 1)
    q = q.reshape(len(flat), -1, group).astype(scales.dtype)
    rows = q * scales[flat][:, :, None] + biases[flat][:, :, None]
    return rows.reshape(*ids.shape, -1).astype(np.float32)


def output_head(x: np.ndarray, norm: nn.Module, head: nn.Module) -> mx.array | None:
    """Logits of the last slice for hidden states ``x`` ``[rows, hidden]`` on the
    host: the final RMS norm in numpy and the head's product by the kernel, so a
    step syncs with MLX nowhere (a sync costs ~65 us, and waited on MLX's thread
    for milliseconds in a busy peer). None when the head is not the kernel's."""
    if type(norm) is not nn.RMSNorm or type(head) not in (
        qgemv.FastQuantizedLinear,
        qgemv.FastQuantizedEmbedding,
    ):
        return None
    if "bias" in head or x.shape[0] > qgemv.MAX_ROWS:
        return None
    weight = getattr(norm, "_dnet_host_weight", None)
    if weight is None:
        weight = np.array(norm.weight.astype(mx.float32), dtype=np.float32)
        object.__setattr__(norm, "_dnet_host_weight", weight)
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32) + norm.eps)
    normed = weight * (x * scale.astype(np.float32))
    return mx.array(qgemv._packed_for(head).on_host(normed))


def _places(c: Any, batch: int, tokens: int) -> tuple[list[int], ...] | None:
    """For each row of the step (batch row by batch row, token by token): its row
    of the cache arrays, its slot, the first slot it attends, its position."""
    if type(c) is KVCache and batch == 1:
        slots = list(range(c.offset, c.offset + tokens))
        return [0] * tokens, slots, [0] * tokens, slots
    if type(c) is BatchKVCache and tokens == 1 and c._right_padding is None:
        padding = c.left_padding.tolist()
        if len(padding) != batch:
            return None
        return list(range(batch)), [c._idx] * batch, padding, [c._idx - p for p in padding]
    return None


def _advance(caches: list[Any], tokens: int, positions: list[int]) -> None:
    """Move the caches past the slots written, as their ``update_and_fetch`` would."""
    if type(caches[0]) is KVCache:
        for c in caches:
            c.offset += tokens
        return
    offset = mx.array([p + 1 for p in positions])
    for c in caches:
        c._idx += 1
        c.offset = offset
