"""GGUF models run as slices give mlx_lm's tokens: against the same weights saved
as safetensors, and against a model built from ``mx.load``'s own reading of the
GGUF file (llama's rotary rows left as llama.cpp stored them)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import pytest
from mlx_lm import load

from dnet.models.model_dir import open_model_dir
from dnet.models.model_profile import model_profile
from dnet.models.tokenizer import load_tokenizer
from dnet.runtime.local import generate, load_chain
from dnet.runtime.slice import load_slice

from ..models.gguf_files import reference_model, write_gguf
from .test_parity import reference_tokens

NEW = 24
CUTS = [(0, 1), (1, 3)]


def mlx_lm_chat(tokenizer, text: str) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
    )


def _dnet_tokens(path, prompt, compute_dtype=None) -> list[int]:
    engines = load_chain(open_model_dir(path), CUTS, compute_dtype=compute_dtype)
    return [t.token_id for t in generate(engines, prompt, NEW, prefill_chunk=5)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_a_float_gguf_matches_its_safetensors_through_mlx_lm(tiny_model, tmp_path, arch):
    source = tiny_model(arch=arch, layers=3)
    path = write_gguf(source, tmp_path / f"{arch}.gguf", "F32")
    model, tokenizer = load(str(source))
    prompt = mlx_lm_chat(tokenizer, "Tell me about foxes.")
    # The GGUF's own tokenizer and template give the same prompt.
    assert (
        load_tokenizer(path).chat_prompt([{"role": "user", "content": "Tell me about foxes."}])
        == prompt
    )
    expected = reference_tokens(model, prompt, NEW)
    assert len(set(expected)) >= 4, expected
    assert _dnet_tokens(path, prompt) == expected


def test_llama_3_rotary_factors_become_mlx_lms_llama3_scaling(tiny_model, tmp_path):
    # Llama 3.1+: llama.cpp stores the scaled frequencies' factors as a tensor; dnet
    # recovers the scaling they came from, so mlx_lm's own rotary code runs.
    source = tmp_path / "llama31"
    shutil.copytree(tiny_model(arch="llama", layers=3), source)
    config = json.loads((source / "config.json").read_text())
    config["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    (source / "config.json").write_text(json.dumps(config))
    path = write_gguf(source, tmp_path / "llama31.gguf", "F32")
    assert open_model_dir(path).config["rope_scaling"] == config["rope_scaling"]
    model, tokenizer = load(str(source))
    prompt = mlx_lm_chat(tokenizer, "Tell me about crows.")
    assert _dnet_tokens(path, prompt) == reference_tokens(model, prompt, NEW)


@pytest.mark.parametrize(
    ("arch", "kind", "embed"),
    [
        ("llama", "Q4_1", "Q8_0"),  # SmolLM2's mix
        ("llama", "Q4_0", None),
        ("llama", "F16", None),
        ("qwen2", "Q8_0", None),
        ("qwen3", "BF16", "Q4_0"),
        ("qwen3", "Q4_1", None),
    ],
)
def test_each_type_and_architecture_matches_mlx_loads_reading(
    tiny_model, tmp_path, arch, kind, embed
):
    source = tiny_model(arch=arch, layers=3)
    path = write_gguf(source, tmp_path / f"{arch}-{kind}.gguf", kind, embed_kind=embed)
    config = json.loads((source / "config.json").read_text())
    tokenizer = load_tokenizer(path)
    prompt = tokenizer.chat_prompt([{"role": "user", "content": "A story, please."}])
    expected = reference_tokens(reference_model(path, config), prompt, NEW)
    assert len(set(expected)) >= 4, expected
    assert _dnet_tokens(path, prompt) == expected


def test_compute_dtype_float32_widens_a_quantized_gguf_as_mlx_lm_would(tiny_model, tmp_path):
    source = tiny_model(arch="llama", layers=3)
    path = write_gguf(source, tmp_path / "q.gguf", "Q4_1", embed_kind="Q8_0")
    config = json.loads((source / "config.json").read_text())
    reference = reference_model(path, config)
    reference.set_dtype(mx.float32)
    prompt = load_tokenizer(path).chat_prompt([{"role": "user", "content": "Hi!"}])
    assert _dnet_tokens(path, prompt, "float32") == reference_tokens(reference, prompt, NEW)
    owned = load_slice(open_model_dir(path), 0, 3, compute_dtype="float32")
    scales = owned.layers[0].self_attn.q_proj.scales
    assert scales.dtype == mx.float32


def test_the_profile_comes_from_the_header_and_matches_what_loads(tiny_model, tmp_path):
    path = write_gguf(
        tiny_model(arch="llama", layers=3), tmp_path / "q.gguf", "Q4_1", embed_kind="Q8_0"
    )
    info = open_model_dir(path)
    for compute_dtype in (None, "float32"):
        profile = model_profile(info, compute_dtype)
        assert not profile.tied_embeddings and profile.activation_bytes == 4 * 64
        owned = load_slice(info, 1, 2, compute_dtype=compute_dtype)
        assert owned.weight_bytes == profile.layer_bytes[1]
        head = load_slice(info, 2, 3, compute_dtype=compute_dtype)
        assert head.weight_bytes == profile.layer_bytes[2] + profile.head_bytes + profile.norm_bytes
