"""The fused decode step (dnet.runtime.fused, native/decode.c) against the MLX
layers it replaces, on the same slice and the same weights."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import BatchKVCache

from dnet.runtime import qgemv
from dnet.runtime.fused import embed_on_host
from dnet.runtime.slice import load_slice


def assert_close(got, want) -> None:
    """Float32 sums in another order (and the kernel's integer grid, as fine as
    float32): each element within 2e-4 of itself, or 1e-5 of the largest one
    (a sum's rounding scales with its largest terms, not with its result)."""
    got, want = np.asarray(got), np.asarray(want)
    atol = 2e-4 + 1e-5 * float(np.max(np.abs(want), initial=0.0))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=atol)


@pytest.fixture(scope="module", autouse=True)
def kernel(quant_kernel):
    """Every test here runs with the kernel."""
    return quant_kernel


def _slice(tiny_model, arch, bits, group, start=0, end=None, **spec):
    path = tiny_model(arch=arch, dtype="float32", quantize=bits, group_size=group, **spec)
    n = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    owned = load_slice(path, start, n if end is None else end)
    assert owned.fused is not None, "these layers should take the fused step"
    return owned


class Both:
    """Run a slice's steps with and without the fused step, on caches of their own."""

    def __init__(self, owned):
        self.owned, self.fused = owned, owned.fused

    def __call__(self, x, cache, fused):
        self.owned.fused = self.fused if fused else None
        try:
            out = self.owned(x, cache)
            mx.eval(out)
            return out
        finally:
            self.owned.fused = self.fused


def _assert_caches_close(mine, theirs):
    for a, b in zip(mine, theirs, strict=True):
        ka, va = a.state[:2]
        kb, vb = b.state[:2]
        n = kb.shape[2] if isinstance(b, BatchKVCache) else b.offset
        assert_close(np.array(ka[..., :n, :]), np.array(kb[..., :n, :]))
        assert_close(np.array(va[..., :n, :]), np.array(vb[..., :n, :]))


@pytest.mark.parametrize(
    ("arch", "bits", "group", "hidden"),
    [
        ("qwen3", 4, 64, 64),
        ("llama", 4, 32, 64),
        ("qwen2", 8, 32, 64),
        ("qwen3", 8, 64, 64),
        ("qwen3", 4, 32, 256),  # layers big enough for the step's threads
    ],
)
def test_a_fused_step_computes_what_the_mlx_layers_compute(tiny_model, arch, bits, group, hidden):
    _check_against_mlx(tiny_model, arch, bits, group, hidden)


LEVELS = list(reversed(range(len(qgemv.LOOPS))))  # every loop of the kernel, best first


@pytest.mark.parametrize("vectors", LEVELS[1:], ids=list(reversed(qgemv.LOOPS))[1:])
def test_the_fused_step_in_every_loop(tiny_model, vectors):
    """The products' other loops, and the portable attention with them (the best
    loop runs everywhere above)."""
    qgemv.use_vectors(vectors)
    try:
        _check_against_mlx(tiny_model, "qwen3", 4, 32, 256)
        _check_against_mlx(tiny_model, "qwen2", 8, 32, 64)
    finally:
        qgemv.use_vectors(LEVELS[0])


def _check_against_mlx(tiny_model, arch, bits, group, hidden):
    # A middle slice (hidden states in and out) and a last one (logits out).
    for start, end in ((1, 3), (0, None)):
        owned = _slice(tiny_model, arch, bits, group, start, end, hidden=hidden)
        run = Both(owned)
        mine, theirs = owned.make_cache(), owned.make_cache()
        rng = np.random.default_rng(3)
        if owned.is_first:
            x = mx.array([[1, 5, 9, 13, 200, 31, 7]])
        else:
            x = mx.array(rng.standard_normal((1, 7, owned.hidden_size)).astype(np.float32))
        # Prefill: a 7-token chunk fused (causal attention within it) against MLX.
        assert_close(np.array(run(x, mine, True)), np.array(run(x, theirs, False)))
        for _ in range(12):
            if owned.is_first:
                step = mx.array([[int(rng.integers(0, 500))]])
            else:
                step = mx.array(rng.standard_normal((1, 1, owned.hidden_size)).astype(np.float32))
            a, b = run(step, mine, True), run(step, theirs, False)
            assert_close(np.array(a), np.array(b))
        assert [c.offset for c in mine] == [c.offset for c in theirs]
        _assert_caches_close(mine, theirs)


def test_mlx_and_the_fused_step_take_turns_on_one_cache(tiny_model):
    """Prefill, fused steps, a second prompt (a chat's next turn: a fused chunk, then
    one by MLX), a trim, and more fused steps, past the cache's first 256 slots."""
    owned = _slice(tiny_model, "qwen3", 4, 32)
    run = Both(owned)
    mine, theirs = owned.make_cache(), owned.make_cache()
    prompt = mx.array([list(range(3, 243))])
    run(prompt, mine, False), run(prompt, theirs, False)
    token = mx.array([[7]])
    for turn in range(2):
        for _ in range(10):
            a, b = run(token, mine, True), run(token, theirs, False)
            assert_close(np.array(a), np.array(b))
            token = mx.argmax(b, axis=-1)[:, None]
        more = mx.array([[11, 12, 13, 14 + turn]])  # fused on the first turn, MLX on the second
        a, b = run(more, mine, turn == 0), run(more, theirs, False)
        assert_close(np.array(a), np.array(b))
        for c in (*mine, *theirs):
            c.trim(2)
    assert mine[0].offset == theirs[0].offset > 256
    _assert_caches_close(mine, theirs)


def test_batched_rows_of_different_lengths(tiny_model):
    """mlx_lm's BatchKVCache (left padding), as dnet's batched decode steps use it:
    the fused step matches MLX, and a row's result is the same alone or batched."""
    owned = _slice(tiny_model, "llama", 4, 32)
    run = Both(owned)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [300, 2], [40, 41, 42, 43]]
    width = max(map(len, prompts))
    padding = [width - len(p) for p in prompts]
    padded = mx.array([[0] * pad + p for pad, p in zip(padding, prompts, strict=True)])
    caches = {}
    for fused in (True, False):
        cache = [BatchKVCache(padding) for _ in owned.layers]
        run(padded, cache, False)
        caches[fused] = cache
    alone = []
    for p in prompts:
        cache = owned.make_cache()
        run(mx.array([p]), cache, False)
        alone.append(cache)
    tokens = mx.array([[1], [2], [3]])
    for _ in range(6):
        a, b = run(tokens, caches[True], True), run(tokens, caches[False], False)
        assert_close(np.array(a), np.array(b))
        rows = [run(tokens[i : i + 1], alone[i], True) for i in range(len(prompts))]
        assert np.array_equal(np.array(mx.concatenate(rows)), np.array(a))
        tokens = mx.argmax(a, axis=-1)[:, None]
    _assert_caches_close(caches[True], caches[False])


def test_layers_it_does_not_take_stay_on_mlx(tiny_model, quant_kernel):
    # bfloat16 activations (MLX rounds each product to them), unquantized layers.
    path = tiny_model(arch="qwen3", dtype="bfloat16", quantize=4, group_size=32)
    assert load_slice(path, 0, 2).fused is None
    path = tiny_model(arch="qwen3", dtype="float32")
    assert load_slice(path, 0, 2).fused is None
    qgemv.configure(None)
    try:
        path = tiny_model(arch="qwen3", dtype="float32", quantize=4, group_size=32)
        assert load_slice(path, 0, 2).fused is None
    finally:
        qgemv.configure(quant_kernel)


@pytest.mark.parametrize(("arch", "bits", "group"), [("qwen3", 4, 32), ("qwen2", 4, 64)])
def test_greedy_tokens_equal_mlx_lm(tiny_model, arch, bits, group):
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    owned = _slice(tiny_model, arch, bits, group)
    path = owned.model.path
    model, _ = load(str(path))
    for prompt in ([1, 5, 9, 13, 200, 31, 7], [300, 2, 2, 2, 40], [4]):
        want = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=24)]
        cache = owned.make_cache()
        logits, got = owned(mx.array([prompt]), cache), []
        for _ in range(24):
            token = mx.argmax(logits, axis=-1)
            got.append(int(token.item()))
            logits = owned(token[:, None], cache)
        assert got == want


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32, mx.bfloat16])
def test_a_quantized_embedding_on_the_host_is_mlx_s_bit_for_bit(bits, dtype):
    table = nn.Embedding(300, 96)
    table.weight = (mx.random.normal((300, 96), key=mx.random.key(bits)) * 3).astype(dtype)
    quantized = nn.QuantizedEmbedding.from_embedding(table, group_size=32, bits=bits)
    ids = mx.array([[0, 299, 17, 17, 150]])
    rows = embed_on_host(quantized, ids)
    if dtype == mx.bfloat16:  # numpy has no bfloat16: MLX embeds
        assert rows is None
        return
    want = np.array(quantized(ids).astype(mx.float32))
    assert rows is not None and rows.dtype == np.float32
    assert np.array_equal(rows, want)
    assert embed_on_host(table, ids) is None  # not quantized: MLX's own lookup
