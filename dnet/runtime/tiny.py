"""Deterministic tiny models, made offline: HF-format directories mlx_lm can load.

Weights come from a seeded NumPy generator, the tokenizer is a byte-level BPE trained
with ``tokenizers`` on a corpus shipped with dnet, and the chat template is ChatML.
The same arguments give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from dnet.runtime.architectures import model_classes

ARCHES = ("qwen3", "qwen2", "deepseek_v2", "llama")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@attrs.frozen
class TinySpec:
    """What to make. ``hidden`` sets the width; heads and sizes follow from it."""

    arch: str = "qwen3"
    layers: int = 4
    hidden: int = 64
    dtype: str = "float32"
    quantize: int | None = None
    group_size: int = 32
    seed: int = 0
    vocab: int = 512
    shards: int = 1
    # Real-size shapes (benchmarks) override the derived ones.
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    intermediate: int | None = None
    tie_embeddings: bool | None = None
    # Embedding rows beyond the tokenizer's (real checkpoints pad theirs too).
    model_vocab: int | None = None
    init_std: float = 0.2
    # deepseek_v2 only: routed experts on every layer after the first. MLX's CPU
    # backend runs the experts' gather_mm in float32 only (quantized ones in any).
    moe: bool = True

    def __attrs_post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"arch must be one of {ARCHES}, got {self.arch!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.quantize not in (None, 4, 8):
            raise ValueError(f"quantize must be 4 or 8, got {self.quantize}")
        if self.layers < 1 or self.hidden < 16 or self.hidden % 16:
            raise ValueError("layers must be >= 1 and hidden a multiple of 16")
        if self.shards < 1:
            raise ValueError("shards must be >= 1")

    @property
    def key(self) -> str:
        """A directory name that identifies this spec."""
        q = f"-q{self.quantize}g{self.group_size}" if self.quantize else ""
        digest = hashlib.sha256(repr(attrs.astuple(self)).encode()).hexdigest()[:10]
        return f"{self.arch}-l{self.layers}-h{self.hidden}-{self.dtype}{q}-{digest}"


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on dnet's bundled corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = resources.files("dnet.runtime").joinpath("data/corpus.txt").read_text("utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
    return tokenizer


def _config(spec: TinySpec, vocab: int, eos: int, bos: int) -> dict[str, Any]:
    h = spec.hidden
    heads = spec.heads or 4
    common: dict[str, Any] = {
        "model_type": spec.arch,
        "hidden_size": h,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": heads,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": spec.dtype,
    }
    if spec.arch == "qwen3":
        common |= {
            "architectures": ["Qwen3ForCausalLM"],
            "num_key_value_heads": spec.kv_heads or 2,
            "head_dim": spec.head_dim or h // heads,
            "intermediate_size": spec.intermediate or 2 * h,
            "tie_word_embeddings": True if spec.tie_embeddings is None else spec.tie_embeddings,
            "rope_theta": 1000000.0,
        }
    elif spec.arch == "qwen2":
        common |= {
            "architectures": ["Qwen2ForCausalLM"],
            "num_key_value_heads": spec.kv_heads or 2,
            "intermediate_size": spec.intermediate or 2 * h,
            "tie_word_embeddings": True if spec.tie_embeddings is None else spec.tie_embeddings,
            "rope_theta": 1000000.0,
        }
    elif spec.arch == "llama":
        common |= {
            "architectures": ["LlamaForCausalLM"],
            "num_key_value_heads": spec.kv_heads or 2,
            "head_dim": spec.head_dim or h // heads,
            "intermediate_size": spec.intermediate or 2 * h,
            "tie_word_embeddings": False if spec.tie_embeddings is None else spec.tie_embeddings,
        }
    else:
        common |= _deepseek_v2(spec, heads)
    return common


def _deepseek_v2(spec: TinySpec, heads: int) -> dict[str, Any]:
    """MLA attention and a MoE on every layer after the first (which stays dense)."""
    h = spec.hidden
    return {
        "architectures": ["DeepseekV2ForCausalLM"],
        "num_key_value_heads": heads,
        "intermediate_size": spec.intermediate or 2 * h,
        "moe_intermediate_size": h,
        "n_shared_experts": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "routed_scaling_factor": 1.0,
        "topk_method": "greedy",
        "first_k_dense_replace": 1 if spec.moe else spec.layers,
        "moe_layer_freq": 1,
        "kv_lora_rank": 32,
        "q_lora_rank": 64,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
        },
        "tie_word_embeddings": False,
    }


def _random_weights(model: nn.Module, spec: TinySpec) -> dict[str, mx.array]:
    rng = np.random.default_rng(spec.seed)
    weights = {}
    for name, param in sorted(tree_flatten(model.parameters())):
        shape = tuple(param.shape)
        if "norm" in name:
            # Norm scales near one; everything else (MoE gate included) random.
            values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            values = spec.init_std * rng.standard_normal(shape, dtype=np.float32)
        weights[name] = mx.array(values).astype(DTYPES[spec.dtype])
    return weights


def _save_weights(out: Path, weights: dict[str, mx.array], shards: int) -> None:
    names = sorted(weights)
    if shards == 1:
        mx.save_safetensors(
            str(out / "model.safetensors"),
            {n: weights[n] for n in names},
            metadata={"format": "mlx"},
        )
        return
    total = sum(weights[n].nbytes for n in names)
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc = 0
    for n in names:
        groups[min(shards - 1, acc * shards // max(total, 1))].append(n)
        acc += weights[n].nbytes
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(
            str(out / file), {n: weights[n] for n in group}, metadata={"format": "mlx"}
        )
        weight_map.update({n: file for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def make_tiny_model(out: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a tiny HF-format model directory at ``out`` and return its path.

    The directory is written next to ``out`` and renamed into place, so a reader
    never sees half a model.
    """
    spec = spec or TinySpec()
    out = Path(out)
    tokenizer = train_tokenizer(spec.vocab)
    vocab = max(tokenizer.get_vocab_size(), spec.model_vocab or 0)
    eos = tokenizer.token_to_id("<|im_end|>")
    bos = tokenizer.token_to_id("<|endoftext|>")
    config = _config(spec, vocab, eos, bos)
    model_cls, args_cls = model_classes(config)
    model = model_cls(args_cls.from_dict(config))
    weights = _random_weights(model, spec)
    model.load_weights(list(weights.items()))
    if spec.quantize:
        quantization = {"group_size": spec.group_size, "bits": spec.quantize, "mode": "affine"}
        nn.quantize(
            model,
            group_size=spec.group_size,
            bits=spec.quantize,
            class_predicate=lambda _, m: (
                hasattr(m, "to_quantized") and m.weight.shape[-1] % spec.group_size == 0
            ),
        )
        config["quantization"] = quantization
        config["quantization_config"] = quantization
        weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _save_weights(tmp, weights, spec.shards)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "model_max_length": 4096,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"eos_token_id": eos, "bos_token_id": bos}, indent=2) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# The model of the local demo and the README's examples.
DEMO_SPEC = TinySpec(arch="qwen3", layers=6, hidden=128)


def ensure_tiny_model(cache_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """The model for ``spec`` under ``cache_dir``, made on first use."""
    spec = spec or TinySpec()
    path = Path(cache_dir) / spec.key
    if not (path / "config.json").is_file():
        make_tiny_model(path, spec)
    return path


__all__ = [
    "ARCHES",
    "DEMO_SPEC",
    "TinySpec",
    "ensure_tiny_model",
    "make_tiny_model",
    "train_tokenizer",
]


if __name__ == "__main__":  # python -m dnet.runtime.tiny ROOT: make the demo's model there
    import sys

    print(ensure_tiny_model(Path(sys.argv[1]), DEMO_SPEC))
