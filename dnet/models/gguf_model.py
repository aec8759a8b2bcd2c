"""A GGUF file as an mlx_lm model: the config its metadata implies and the
Hugging Face names of its tensors.

llama.cpp's converter renames tensors (``blk.3.attn_q.weight`` for
``model.layers.3.self_attn.q_proj.weight``) and, for the ``llama`` architecture
only, reorders the rows of Q and K within each head for its rotary convention
(``gguf_tensors.unpermute_rows`` undoes it). Everything else maps one to one onto
mlx_lm's ``llama``, ``qwen2`` and ``qwen3`` classes. Imports no mlx.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import numpy as np

from dnet.errors import InvalidModel, UnsupportedArchitecture, UnsupportedTensorType
from dnet.models.gguf import BLOCKS, FLOAT_DTYPES, GROUP_SIZE, QUANT_BITS, GGUFHeader

# general.architecture → mlx_lm model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Architectures whose Q and K rows llama.cpp's converter permuted.
PERMUTED_QK = {"llama"}

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?([a-z_]+)\.(weight|bias)$")
# llama.cpp's precomputed rotary factors (Llama 3.1+): mlx_lm computes its own from
# the rope scaling they imply.
ROPE_FREQS = "rope_freqs.weight"


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if mlx_lm has no place for it."""
    match = _NAME.match(name)
    if match is None:
        return None
    layer, part, kind = match.groups()
    if layer is None:
        module = _TOP.get(part)
        return f"{module}.{kind}" if module else None
    module = _BLOCK.get(part)
    return f"model.layers.{layer}.{module}.{kind}" if module else None


def check_tensor_types(header: GGUFHeader) -> None:
    """Raises:
    UnsupportedTensorType: a tensor of a type dnet cannot load, named with its type
        and what to use instead.
    """
    bad = [t for t in header.tensors.values() if t.type not in BLOCKS]
    if not bad:
        return
    kinds = Counter(t.type for t in bad)
    listed = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    raise UnsupportedTensorType(
        f"{header.path.name}: tensor {bad[0].name} is {bad[0].type} ({len(bad)} of "
        f"{len(header.tensors)} tensors are of types dnet cannot load: {listed}). dnet "
        f"loads GGUF tensors of types {', '.join(BLOCKS)}; use a Q8_0, Q4_0 or Q4_1 file "
        "of this model (or re-quantize one with llama.cpp's llama-quantize), or its "
        "safetensors/MLX release"
    )


def _key(header: GGUFHeader, name: str, default: Any = None) -> Any:
    arch = header.architecture
    value = header.metadata.get(f"{arch}.{name}", default)
    if value is None:
        raise InvalidModel(f"{header.path.name} has no {arch}.{name} in its metadata")
    if hasattr(value, "shape") and value.shape != ():
        if len(set(value.tolist())) != 1:
            raise UnsupportedArchitecture(
                f"{header.path.name}: {arch}.{name} differs from layer to layer; "
                "dnet runs models whose layers share one shape"
            )
        value = value.tolist()[0]
    return value.item() if hasattr(value, "item") else value


def quantization(header: GGUFHeader) -> dict[str, Any] | None:
    """mlx_lm's quantization config for the file's quantized tensors: the most
    common bit width, and an entry per module stored with another."""
    quantized = {}
    for t in header.tensors.values():
        name = hf_name(t.name)
        if t.type in QUANT_BITS and name is not None:
            quantized[name.rsplit(".", 1)[0]] = QUANT_BITS[t.type]
    if not quantized:
        return None
    bits = Counter(quantized.values()).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    for module, b in sorted(quantized.items()):
        if b != bits:
            config[module] = {"group_size": GROUP_SIZE, "bits": b}
    return config


def file_type(header: GGUFHeader) -> str:
    """The type holding most of the file's bytes (``Q4_1``, ``F16``...)."""
    sizes: Counter[str] = Counter()
    for t in header.tensors.values():
        sizes[t.type] += t.nbytes
    return sizes.most_common(1)[0][0] if sizes else "F32"


def model_config(header: GGUFHeader) -> dict[str, Any]:
    """The mlx_lm config (``config.json``'s keys) the file's metadata implies.

    Raises:
        UnsupportedArchitecture: an architecture other than llama, qwen2, qwen3, or
            one with per-layer shapes.
        UnsupportedTensorType, InvalidModel: see ``check_tensor_types``; missing keys.
    """
    arch = header.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{header.path.name} is a GGUF of architecture {arch!r}; dnet runs GGUF "
            f"architectures {', '.join(sorted(ARCHITECTURES))}"
        )
    check_tensor_types(header)
    embed = header.tensors.get("token_embd.weight")
    if embed is None:
        raise InvalidModel(f"{header.path.name} has no token_embd.weight")
    unknown = [n for n in header.tensors if hf_name(n) is None and n != ROPE_FREQS]
    if unknown:
        raise UnsupportedArchitecture(
            f"{header.path.name}: tensor {unknown[0]} has no place in mlx_lm's {arch} model"
        )
    hidden = int(_key(header, "embedding_length"))
    heads = int(_key(header, "attention.head_count"))
    config: dict[str, Any] = {
        "model_type": ARCHITECTURES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": int(_key(header, "block_count")),
        "intermediate_size": int(_key(header, "feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_key(header, "attention.head_count_kv", heads)),
        "head_dim": int(_key(header, "attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_key(header, "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_key(header, "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_key(header, "context_length")),
        "vocab_size": embed.shape[0],
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "torch_dtype": _float_dtype(header),
        "gguf_file_type": file_type(header),
    }
    if arch == "llama":
        # Llama's q/k/v and o projections carry biases in some conversions.
        config["attention_bias"] = "blk.0.attn_q.bias" in header.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in header.tensors
    scaling = _rope_scaling(header)
    if scaling is not None:
        config["rope_scaling"] = scaling
    for key, meta in (("eos_token_id", "eos_token_id"), ("bos_token_id", "bos_token_id")):
        value = header.metadata.get(f"tokenizer.ggml.{meta}")
        if value is not None:
            config[key] = int(value)
    quant = quantization(header)
    if quant is not None:
        config["quantization"] = quant
    return config


def _float_dtype(header: GGUFHeader) -> str:
    """The dtype of the file's unquantized matrices (float16 when every matrix is
    quantized: their scales are)."""
    kinds = Counter(
        FLOAT_DTYPES[t.type]
        for t in header.tensors.values()
        if t.type in FLOAT_DTYPES and len(t.shape) == 2
    )
    return kinds.most_common(1)[0][0] if kinds else "float16"


def _rope_scaling(header: GGUFHeader) -> dict[str, Any] | None:
    if ROPE_FREQS in header.tensors:
        return _llama3_scaling(header)
    arch = header.architecture
    kind = header.metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(header.metadata.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = header.metadata.get(f"{arch}.rope.scaling.original_context_length")
        if original is None:
            raise InvalidModel(
                f"{header.path.name}: yarn rope scaling without its original context"
            )
        return {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": int(original),
        }
    raise UnsupportedArchitecture(f"{header.path.name}: rope scaling {kind!r} is not supported")


# Llama 3's rope scaling: (low_freq_factor, high_freq_factor, original context).
_LLAMA3_CANDIDATES = [
    (low, high, original)
    for original in (8192, 4096, 16384, 32768, 2048)
    for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0))
]


def _llama3_scaling(header: GGUFHeader) -> dict[str, Any]:
    """mlx_lm's ``llama3`` rope scaling that computes the per-frequency factors
    llama.cpp's converter stored as ``rope_freqs.weight`` (Llama 3.1 and later),
    so that mlx_lm's own rotary code runs, as for the model's safetensors.

    Raises:
        UnsupportedArchitecture: factors no Llama 3 setting reproduces.
    """
    tensor = header.tensors[ROPE_FREQS]
    stored = np.fromfile(header.path, "<f4", math.prod(tensor.shape), offset=tensor.offset)
    arch = header.architecture
    base = float(header.metadata.get(f"{arch}.rope.freq_base", 10000.0))
    dims = 2 * len(stored)
    wavelens = 2 * math.pi * base ** (np.arange(0, dims, 2) / dims)
    factor = float(stored.max())
    for low, high, original in _LLAMA3_CANDIDATES:
        smooth = (original / wavelens - low) / (high - low)
        expected = np.where(
            wavelens < original / high,
            1.0,
            np.where(wavelens > original / low, factor, 1 / ((1 - smooth) / factor + smooth)),
        )
        if np.allclose(stored, expected, rtol=1e-5, atol=0):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
    raise UnsupportedArchitecture(
        f"{header.path.name}: its rotary factors ({ROPE_FREQS}) match no Llama 3 rope "
        "scaling dnet knows; use the model's safetensors/MLX release"
    )
