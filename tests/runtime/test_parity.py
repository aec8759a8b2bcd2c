"""The sliced runtime produces exactly mlx_lm's tokens, however the model is cut."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from dnet.errors import BackendUnsupported
from dnet.models.model_dir import open_model_dir
from dnet.runtime.local import generate, load_chain
from dnet.runtime.slice import load_slice

NEW_TOKENS = 32
CUTS = {
    1: [(0, 4)],
    2: [(0, 1), (1, 4)],  # uneven, with a one-layer slice
    3: [(0, 2), (2, 3), (3, 4)],
}
VARIANTS = [
    ("qwen3", "float32", None),
    ("qwen3", "bfloat16", None),
    ("qwen3", "bfloat16", 4),
    ("qwen3", "float16", 8),
    ("deepseek_v2", "float32", None),
    ("deepseek_v2-dense", "bfloat16", None),
    ("deepseek_v2", "bfloat16", 4),
    ("deepseek_v2", "float32", 8),
    ("llama", "bfloat16", None),
]


def chat_prompt(tokenizer, text: str = "Tell me a story about a fox and a crow.") -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )


def reference_tokens(model, prompt: list[int], n: int = NEW_TOKENS, **kw) -> list[int]:
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, **kw)]


@pytest.mark.parametrize(("arch", "dtype", "bits"), VARIANTS)
def test_slices_match_mlx_lm_tokens(tiny_model, arch, dtype, bits):
    arch, _, variant = arch.partition("-")
    path = tiny_model(arch=arch, dtype=dtype, quantize=bits, moe=variant != "dense")
    model, tokenizer = load(str(path))
    prompt = chat_prompt(tokenizer)
    expected = reference_tokens(model, prompt)
    # A test of parity on a model that repeats one token would prove little.
    assert len(set(expected)) >= 4, expected
    info = open_model_dir(path)
    for parts, cuts in CUTS.items():
        engines = load_chain(info, cuts)
        one_chunk = [t.token_id for t in generate(engines, prompt, NEW_TOKENS)]
        assert one_chunk == expected, f"{parts} slices, one prefill chunk"
        chunked = [t.token_id for t in generate(engines, prompt, NEW_TOKENS, prefill_chunk=4)]
        assert chunked == expected, f"{parts} slices, prefill in chunks of 4"
        assert all(e.statistics().requests == 0 for e in engines)


@pytest.mark.parametrize(("arch", "moe"), [("qwen3", True), ("deepseek_v2", False)])
def test_bfloat16_boundaries_keep_logits_bit_identical(tiny_model, arch, moe):
    path = tiny_model(arch=arch, dtype="bfloat16", moe=moe)
    model, tokenizer = load(str(path))
    prompt = chat_prompt(tokenizer)
    whole = model(mx.array(prompt)[None])[:, -1, :]
    info = open_model_dir(path)
    results = []
    for cuts in CUTS.values():
        engines = load_chain(info, cuts)
        for e in engines:
            e.start("r")
        x: object = prompt
        for e in engines[:-1]:
            x = e.run("r", x)
            assert x.dtype == "bfloat16"
        logits = engines[-1].logits("r", x)
        results.append(logits)
    first = results[0]
    for other in results[1:]:
        assert other.data == first.data, "cutting the model changed the logits' bits"
    got = mx.array(list(memoryview(first.data).cast("f")))
    assert mx.array_equal(got, whole[0].astype(mx.float32)).item()


def test_sharded_checkpoint_loads_the_same(tiny_model):
    sharded = tiny_model(arch="deepseek_v2", shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    single = tiny_model(arch="deepseek_v2")
    model, tokenizer = load(str(single))
    prompt = chat_prompt(tokenizer)
    expected = reference_tokens(model, prompt)
    engines = load_chain(sharded, CUTS[3])
    assert [t.token_id for t in generate(engines, prompt, NEW_TOKENS)] == expected


def test_long_prompt_in_many_chunks(tiny_model):
    path = tiny_model(arch="qwen3", dtype="float32")
    model, tokenizer = load(str(path))
    prompt = chat_prompt(tokenizer, "The quick brown fox jumps over the lazy dog. " * 12)
    assert len(prompt) > 100
    expected = reference_tokens(model, prompt, prefill_step_size=16)
    engines = load_chain(path, CUTS[2])
    assert [t.token_id for t in generate(engines, prompt, NEW_TOKENS, prefill_chunk=16)] == expected
    assert [t.token_id for t in generate(engines, prompt, NEW_TOKENS, prefill_chunk=7)] == expected


def test_deepseek_bfloat16_moe_matches_mlx_lm_or_fails_like_it(tiny_model):
    """MLX's CPU backend (0.32) has no bfloat16 gather_mm, so mlx_lm cannot run an
    unquantized bfloat16 DeepSeek-V2 MoE there. Where mlx_lm runs it, the slices
    must match it; where it cannot, loading a slice with experts says why."""
    path = tiny_model(arch="deepseek_v2", dtype="bfloat16")
    model, tokenizer = load(str(path))
    prompt = chat_prompt(tokenizer)
    info = open_model_dir(path)
    try:
        expected = reference_tokens(model, prompt)
    except RuntimeError as exc:
        assert "GatherMM" in str(exc)
        assert load_slice(info, 0, 1).num_layers == 1  # the dense first layer runs
        with pytest.raises(BackendUnsupported, match="GatherMM"):
            load_slice(info, 1, 4)
        return
    engines = load_chain(info, CUTS[3])
    assert [t.token_id for t in generate(engines, prompt, NEW_TOKENS)] == expected
