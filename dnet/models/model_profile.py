"""A model's costs from its config and safetensors or GGUF headers; no weights read.

Lives beside ``model_dir`` (I/O) and feeds ``dnet.solver`` (pure). Imports no mlx.
"""

from __future__ import annotations

import math

from dnet.errors import OverMemoryBudget
from dnet.models.gguf import GROUP_SIZE, QUANT_BITS
from dnet.models.model_dir import ModelDir, TensorInfo
from dnet.solver.profiles import ModelProfile

_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}
_EXPERTS = (".mlp.switch_mlp.", ".mlp.experts.")


def _params(name: str, info: TensorInfo, bits: int | None) -> int:
    """Weights a matmul multiplies by, unpacking MLX's packed uint32 quantization."""
    if name.endswith((".scales", ".biases")) and bits:
        return 0
    count = math.prod(info.shape)
    if info.dtype in QUANT_BITS:  # a GGUF quantized matrix: its shape counts weights
        return count
    if info.dtype == "U32" and bits:
        count = count * 32 // bits
    return count


def model_profile(model: ModelDir, compute_dtype: str | None = None) -> ModelProfile:
    """The per-layer bytes, FLOPs and KV growth of ``model``, as stored, or with its
    16-bit floats widened when it runs in ``compute_dtype="float32"``."""
    widen = compute_dtype == "float32"

    def nbytes(info: TensorInfo) -> int:
        if widen and info.dtype in ("F16", "BF16"):
            return info.nbytes * 2
        if widen and info.dtype in QUANT_BITS:  # its float16 scales and biases widen
            return info.nbytes + math.prod(info.shape) // GROUP_SIZE * 4
        return info.nbytes

    config = model.config
    n = model.num_layers
    quant = config.get("quantization") or {}
    bits = quant.get("bits")
    routed = config.get("n_routed_experts") or 0
    active = (config.get("num_experts_per_tok") or 0) / routed if routed else 1.0
    layer_bytes = [0] * n
    layer_flops = [0.0] * n
    embed = head = norm = 0
    act_dtype = None
    for name, info in model.tensors.items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            if not 0 <= i < n:
                continue
            layer_bytes[i] += nbytes(info)
            share = active if any(tag in name for tag in _EXPERTS) else 1.0
            if len(info.shape) >= 2:
                layer_flops[i] += 2 * _params(name, info, bits) * share
            if act_dtype is None and name.endswith("input_layernorm.weight"):
                act_dtype = info.dtype
        elif name.startswith("model.embed_tokens."):
            embed += nbytes(info)
        elif name.startswith("lm_head."):
            head += nbytes(info)
        elif name.startswith("model.norm."):
            norm += nbytes(info)
    tied = head == 0
    act_bytes = 4 if widen else _DTYPE_BYTES.get(act_dtype or "F32", 4)
    hidden = int(config["hidden_size"])
    vocab = int(config["vocab_size"])
    return ModelProfile(
        name=model.name,
        num_layers=n,
        layer_bytes=tuple(layer_bytes),
        layer_flops=tuple(int(f) for f in layer_flops),
        kv_bytes_per_token=tuple([_kv_per_token(config, act_bytes)] * n),
        embed_bytes=embed,
        head_bytes=embed if tied else head,
        norm_bytes=norm,
        head_flops=2 * hidden * vocab,
        tied_embeddings=tied,
        activation_bytes=hidden * act_bytes,
        embed_resident=False,  # a first slice reads its rows from the file
    )


def _kv_per_token(config: dict, act_bytes: int) -> int:
    heads = int(config["num_attention_heads"])
    if config["model_type"] == "deepseek_v2":
        # mlx_lm's MLA caches full per-head keys (nope + rope) and values.
        k = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
        return heads * (k + config["v_head_dim"]) * act_bytes
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return 2 * kv_heads * head_dim * act_bytes


def check_budget(
    model: ModelDir, start: int, end: int, compute_dtype: str | None, context: int, budget: int
) -> None:
    """Raises:
    OverMemoryBudget: layers ``[start, end)`` need more than ``budget`` bytes for
        their weights and a KV cache of ``context`` positions.
    """
    need = model_profile(model, compute_dtype).slice_memory(start, end, context)
    if need > budget:
        raise OverMemoryBudget(
            f"layers [{start}, {end}) of {model.name} need {need / 2**20:.0f} MiB at a "
            f"context of {context} (weights and KV cache), over this peer's --max-memory "
            f"of {budget / 2**20:.0f} MiB"
        )
