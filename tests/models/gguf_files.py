"""GGUF files for tests, written with llama.cpp's own ``gguf`` package the way its
converter (``convert_hf_to_gguf.py``) writes them, and references built from
them with mlx_lm's model classes and ``mx.load``'s own GGUF conversion.

Kept apart from dnet's reader on purpose: the names, the Q/K row permutation and
the metadata keys are spelled out here a second time, from llama.cpp's side.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
QUANTIZED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


def gguf_name(hf: str) -> str:
    for old, new in HF_TO_GGUF.items():
        if hf.startswith(old + "."):
            return new + hf[len(old) :]
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    for old, new in HF_TO_GGUF.items():
        if rest.startswith(old + "."):
            return f"blk.{layer}.{new}{rest[len(old) :]}"
    raise KeyError(hf)


def hf_name(name: str) -> str:
    for hf, g in HF_TO_GGUF.items():
        if name.startswith(g + "."):
            return hf + name[len(g) :]
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        part, kind = rest.rsplit(".", 1)
        hf = next(h for h, g in HF_TO_GGUF.items() if g == part)
        return f"model.layers.{layer}.{hf}.{kind}"
    raise KeyError(name)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute`` of llama.cpp's converter: per head, the halves of
    Hugging Face's rotary layout become interleaved pairs."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    model_dir: Path,
    out: Path,
    kind: str = "F32",
    *,
    embed_kind: str | None = None,
    raw: dict[str, tuple[str, np.ndarray]] | None = None,
    pre: str = "gpt-2",
) -> Path:
    """Convert a tiny HF model directory to GGUF: 2-D weights as ``kind`` (F32,
    F16, BF16, Q4_0, Q4_1, Q8_0), the embeddings as ``embed_kind``, norms and
    biases in F32; ``raw`` replaces tensors by (type name, [rows, row bytes])."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = config["model_type"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    weights = mx.load(str(next(model_dir.glob("*.safetensors"))))
    writer = gguf.GGUFWriter(str(out), arch)
    _metadata(writer, arch, config)
    _tokenizer(writer, model_dir, config, pre)
    for name in sorted(weights):
        array = np.array(weights[name].astype(mx.float32))
        if arch == "llama" and ".self_attn.q_proj." in name:
            array = llama_cpp_permute(array, heads)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            array = llama_cpp_permute(array, kv_heads)
        target = gguf_name(name)
        if raw and target in raw:
            qtype, data = raw[target]
            writer.add_tensor(target, data, raw_dtype=T[qtype])
            continue
        chosen = embed_kind if name.startswith("model.embed_tokens") and embed_kind else kind
        if array.ndim == 1 or chosen == "F32":
            writer.add_tensor(target, array)
        elif chosen == "F16":
            writer.add_tensor(target, array.astype(np.float16))
        else:
            writer.add_tensor(target, quants.quantize(array, T[chosen]), raw_dtype=T[chosen])
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """The per-frequency factors llama.cpp's converter stores for Llama 3.1+."""
    scaling = config["rope_scaling"]
    dims = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    out = []
    for freq in 1.0 / (config["rope_theta"] ** (np.arange(0, dims, 2, dtype=np.float32) / dims)):
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _metadata(writer: gguf.GGUFWriter, arch: str, config: dict[str, Any]) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_name("tiny " + arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _tokenizer(writer: gguf.GGUFWriter, model_dir: Path, config: dict[str, Any], pre: str) -> None:
    data = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), config["vocab_size"])]
    special = {t["content"] for t in data["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(
        [3 if t in special else 5 if t.startswith("[PAD") else 1 for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(False)
    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    writer.add_chat_template(template)


def reference_model(path: Path, config: dict[str, Any]) -> nn.Module:
    """mlx_lm's model for a GGUF file, from ``mx.load``'s conversion of it and the
    ``config`` it was made from. Llama keeps llama.cpp's row order and runs its
    rotary embedding in the matching interleaved ("traditional") mode instead."""
    weights = {hf_name(k): v for k, v in mx.load(str(path)).items()}
    # mx.load names a quantized weight's parts "<stem>.scales" and "<stem>.biases".
    config = dict(config)
    if config["model_type"] == "llama":
        config["rope_traditional"] = True
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    if config.get("tie_word_embeddings", True):
        weights.pop("lm_head.weight", None)
    quantized = {k.removesuffix(".scales") for k in weights if k.endswith(".scales")}

    def predicate(path: str, module: nn.Module) -> bool | dict[str, int]:
        if path not in quantized:
            return False
        bits = 32 * weights[path + ".weight"].shape[-1] // module.weight.shape[-1]
        return {"group_size": 32, "bits": bits}

    nn.quantize(model, class_predicate=predicate)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    return model
