"""dnet's quantized decode kernel (``native/qgemv.c``): its products against MLX's
``dequantize`` and a float32 matmul for every bits/group/scale-type combination and
odd shapes, in its vector and portable loops; a row's result the same alone or
batched; and greedy tokens of routed slices equal to mlx_lm's on the same weights."""

from __future__ import annotations

import itertools

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from dnet.runtime import qgemv
from dnet.runtime.slice import load_slice

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
LEVELS = list(reversed(range(len(qgemv.LOOPS))))  # every loop, best first
BEST = LEVELS[0]


@pytest.fixture(scope="module", autouse=True)
def kernel(quant_kernel):
    """Every test here runs with the kernel."""
    return quant_kernel


def reference(x, q, s, b, bits, group):
    w = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=group, bits=bits)
    return x.astype(mx.float32) @ w.T


def quantized(n, k, bits, group, dtype, seed):
    w = mx.random.normal((n, k), key=mx.random.key(seed)).astype(dtype)
    return mx.quantize(w, group_size=group, bits=bits)


@pytest.mark.parametrize("vectors", LEVELS, ids=list(reversed(qgemv.LOOPS)))
@pytest.mark.parametrize(("bits", "group"), list(itertools.product((4, 8), (32, 64, 128))))
def test_products_match_dequantize_then_matmul(vectors, bits, group):
    qgemv.use_vectors(vectors)
    try:
        for i, (dtype, (n, k), rows) in enumerate(
            itertools.product(DTYPES, [(1, group), (7, 3 * group), (33, 5 * group)], (1, 3, 8))
        ):
            q, s, b = quantized(n, k, bits, group, dtype, i)
            x = mx.random.normal((rows, k), key=mx.random.key(100 + i))
            got = qgemv.qgemv(x, q, s, b, bits, group)
            want = reference(x, q, s, b, bits, group)
            # float32 rounding of a k-term sum, each term of size |w||x|
            bound = (
                1e-6
                * k
                * float(mx.max(mx.abs(x)))
                * float(mx.max(mx.abs(mx.dequantize(q, s, b, group_size=group, bits=bits))))
            )
            err = float(mx.max(mx.abs(got - want)))
            assert err <= bound, (dtype, n, k, rows, err, bound)
    finally:
        qgemv.use_vectors(BEST)


@pytest.mark.parametrize("vectors", LEVELS, ids=list(reversed(qgemv.LOOPS)))
def test_a_row_is_the_same_alone_or_batched(vectors):
    qgemv.use_vectors(vectors)
    try:
        for bits, group, dtype in [(4, 32, mx.float16), (8, 64, mx.bfloat16), (4, 128, mx.float32)]:
            q, s, b = quantized(96, 4 * group, bits, group, dtype, bits + group)
            x = mx.random.normal((8, 4 * group), key=mx.random.key(7))
            batched = np.array(qgemv.qgemv(x, q, s, b, bits, group))
            for r in range(8):
                alone = np.array(qgemv.qgemv(x[r : r + 1], q, s, b, bits, group))
                assert np.array_equal(alone[0], batched[r])
            for m in range(2, 8):
                part = np.array(qgemv.qgemv(x[:m], q, s, b, bits, group))
                assert np.array_equal(part, batched[:m])
    finally:
        qgemv.use_vectors(BEST)


@pytest.mark.parametrize("vectors", LEVELS, ids=list(reversed(qgemv.LOOPS)))
def test_products_of_far_apart_magnitudes_and_of_nan_and_inf(vectors):
    """Activations a float32 product takes in its stride: groups of very different
    sizes in one row (the int8 loop's grid is per group of 32), values near the
    ends of float32's range, zeros; a nan or an inf makes the row's results nan or
    infinite, as a float product's."""
    qgemv.use_vectors(vectors)
    try:
        q, s, b = quantized(40, 256, 4, 32, mx.float16, 5)
        w = np.array(mx.dequantize(q, s, b, group_size=32, bits=4), dtype=np.float64)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((6, 256))
        x[0] *= 10.0 ** rng.integers(-6, 7, size=256)  # each value its own size
        x[1] *= np.repeat(10.0 ** rng.integers(-12, 13, size=8), 32)  # each group
        x[2] *= 1e30
        x[3] *= 1e-30
        x[4, 64:96] = 0.0
        x[5] = 0.0
        got = np.array(qgemv.qgemv(mx.array(x.astype(np.float32)), q, s, b, 4, 32))
        want = x.astype(np.float32).astype(np.float64) @ w.T
        # float32 rounding of each group's largest value and of the sums
        tops = np.abs(x).reshape(6, 8, 32).max(axis=2).repeat(32, axis=1)
        bound = 1e-6 * 256 * (tops @ np.abs(w).T) + 1e-37
        assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
        assert np.all(got[5] == 0.0)
        bad = x[:2].astype(np.float32)
        bad[0, 100], bad[1, 7] = np.nan, np.inf
        out = np.array(qgemv.qgemv(mx.array(bad), q, s, b, 4, 32))
        assert np.all(np.isnan(out[0])) and not np.any(np.isfinite(out[1]))
    finally:
        qgemv.use_vectors(BEST)


def test_a_routed_layer_takes_any_number_of_rows():
    q, s, b = quantized(16, 64, 4, 32, mx.float32, 0)
    with pytest.raises(ValueError, match="refused"):
        qgemv.qgemv(mx.zeros((9, 64)), q, s, b, 4, 32)  # the kernel itself: 8 rows at most
    layer = nn.QuantizedLinear(64, 16, bias=True, group_size=32, bits=4)
    assert qgemv.route(layer) == 1 and type(layer) is qgemv.FastQuantizedLinear
    for rows in (1, 2, 12, 40):  # the kernel; in chunks of 8; float32 tiles
        x = mx.random.normal((1, rows, 64), key=mx.random.key(rows))
        want = mx.quantized_matmul(
            x, layer.weight, layer.scales, layer.biases, transpose=True, group_size=32, bits=4
        )
        assert mx.allclose(layer(x), want + layer.bias, atol=1e-4), rows
    # Half-precision activations stay on MLX's product, exactly (see qgemv's doc).
    half = nn.QuantizedLinear(64, 16, bias=False, group_size=32, bits=4)
    half.set_dtype(mx.bfloat16)
    qgemv.route(half)
    x = mx.random.normal((1, 2, 64), key=mx.random.key(9)).astype(mx.bfloat16)
    want = mx.quantized_matmul(
        x, half.weight, half.scales, half.biases, transpose=True, group_size=32, bits=4
    )
    assert mx.array_equal(half(x), want)


def greedy_reference(path, prompt, n):
    model, _ = load(str(path))
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n)]


def greedy_sliced(path, prompt, n, compute_dtype=None):
    owned = load_slice(path, 0, _layers(path), compute_dtype=compute_dtype)
    assert any(
        type(m) is qgemv.FastQuantizedLinear
        for layer in owned.layers
        for _, m in layer.named_modules()
    )
    cache = owned.make_cache()
    logits = owned(mx.array([prompt]), cache)
    out = []
    for _ in range(n):
        token = mx.argmax(logits, axis=-1)
        out.append(int(token.item()))
        logits = owned(token[:, None], cache)
    return out


def _layers(path):
    import json

    return json.loads((path / "config.json").read_text())["num_hidden_layers"]


@pytest.mark.parametrize(
    ("arch", "bits", "group"),
    [("qwen3", 4, 64), ("llama", 4, 32), ("qwen3", 8, 32), ("llama", 8, 128)],
)
def test_greedy_tokens_equal_mlx_lm_on_the_same_quantized_weights(tiny_model, arch, bits, group):
    path = tiny_model(arch=arch, dtype="float32", quantize=bits, group_size=group)
    # Prompts of 7, 5, 13 and 40 tokens: prefill by the kernel, in chunks, and in tiles.
    prompts = [[1, 5, 9, 13, 200, 31, 7], [300, 2, 2, 2, 40], list(range(3, 40, 3))]
    prompts.append(list(range(5, 205, 5)))
    for prompt in prompts:
        assert greedy_sliced(path, prompt, 16) == greedy_reference(path, prompt, 16)


def test_a_quantized_profile_measures_the_product_slices_use(quant_kernel):
    """The device profile of a quantized model counts packed bytes at the rate of
    the product its slices use: with the kernel, several times MLX's."""
    from dnet.runtime.device_profile import measure

    fast = measure("float32", 512, matvec_mib=2, bits=4)
    qgemv.configure(None)
    try:
        slow = measure("float32", 512, matvec_mib=2, bits=4)
    finally:
        assert qgemv.configure(quant_kernel)
    assert fast.bandwidth_bytes_s > 2 * slow.bandwidth_bytes_s > 0
    assert fast.layer_overhead_s > 0 and slow.layer_overhead_s > 0
