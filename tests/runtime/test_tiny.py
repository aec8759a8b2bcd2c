"""Tiny models: deterministic, loadable by mlx_lm, with a real tokenizer and template."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlx_lm import generate, load
from mlx_lm.models.switch_layers import SwitchGLU

from dnet.runtime.tiny import TinySpec, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_same_seed_same_bytes(tmp_path):
    spec = TinySpec(arch="deepseek_v2", dtype="bfloat16", quantize=4, seed=3)
    a = make_tiny_model(tmp_path / "a", spec)
    b = make_tiny_model(tmp_path / "b", spec)
    assert digest(a) == digest(b)
    c = make_tiny_model(
        tmp_path / "c", TinySpec(arch="deepseek_v2", dtype="bfloat16", quantize=4, seed=4)
    )
    assert digest(c)["model.safetensors"] != digest(a)["model.safetensors"]
    assert digest(c)["tokenizer.json"] == digest(a)["tokenizer.json"]


def test_script_writes_the_same_model_in_a_fresh_process(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/make_tiny_model.py"),
            "--arch",
            "qwen3",
            "--out",
            str(out),
            "--dtype",
            "float16",
            "--quantize",
            "8",
            "--layers",
            "3",
            "--hidden",
            "96",
            "--seed",
            "5",
        ],
        check=True,
        capture_output=True,
    )
    same = make_tiny_model(
        tmp_path / "lib",
        TinySpec(arch="qwen3", dtype="float16", quantize=8, layers=3, hidden=96, seed=5),
    )
    assert digest(out) == digest(same)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert config["num_hidden_layers"] == 3 and config["hidden_size"] == 96


@pytest.mark.parametrize("arch", ["qwen3", "deepseek_v2", "llama"])
def test_mlx_lm_loads_and_generates(tiny_model, arch):
    path = tiny_model(arch=arch)
    model, tokenizer = load(str(path))
    assert tokenizer.has_chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True
    )
    text = tokenizer.decode(prompt)
    assert text == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(generate(model, tokenizer, prompt, max_tokens=8), str)
    # Ordinary text round-trips through the trained BPE.
    sample = "The capital of France is Paris. def add(a, b): return a + b"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    assert len(tokenizer.encode(sample)) < len(sample.encode()) / 2


def test_deepseek_v2_exercises_moe_and_mla(tiny_model):
    model, _ = load(str(tiny_model(arch="deepseek_v2")))
    layers = model.model.layers
    assert not isinstance(
        getattr(layers[0].mlp, "switch_mlp", None), SwitchGLU
    )  # dense first layer
    assert all(isinstance(layer.mlp.switch_mlp, SwitchGLU) for layer in layers[1:])
    gate = layers[1].mlp.gate.weight
    assert gate.abs().max().item() > 0  # mlx_lm initialises the gate to zeros; ours is random
    attn = layers[0].self_attn
    assert attn.q_lora_rank and attn.kv_lora_rank  # MLA: low-rank q and compressed kv
    assert "q_a_proj" in attn and "kv_a_proj_with_mqa" in attn


def test_sharded_model_has_an_index(tiny_model):
    path = tiny_model(arch="qwen3", shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all((path / f).is_file() for f in files)
