"""Model profiles from headers agree with what slices really load and cache."""

from __future__ import annotations

import pytest

from dnet.models.model_dir import open_model_dir
from dnet.models.model_profile import model_profile
from dnet.runtime.arrays import to_host
from dnet.runtime.engine import SliceEngine
from dnet.runtime.slice import load_slice
from dnet.solver.solve import _Costs


@pytest.mark.parametrize(
    ("arch", "dtype", "bits"),
    [("qwen3", "float32", None), ("deepseek_v2", "bfloat16", 4), ("llama", "bfloat16", 8)],
)
def test_profile_predicts_slice_bytes_and_kv(tiny_model, arch, dtype, bits):
    import mlx.core as mx

    info = open_model_dir(tiny_model(arch=arch, dtype=dtype, quantize=bits))
    profile = model_profile(info)
    assert profile.weight_bytes == info.weight_bytes
    costs = _Costs(profile, context=0)
    for start, end in [(0, 1), (1, 3), (3, 4), (0, 4)]:
        assert costs.memory(start, end) == load_slice(info, start, end).weight_bytes
    middle = load_slice(info, 1, 3)
    engine = SliceEngine(middle)
    engine.start("r")
    engine.run("r", to_host(mx.zeros((1, 10, middle.hidden_size), dtype=middle.activation_dtype)))
    # mlx_lm's KVCache grows in steps of 256 positions.
    assert engine.kv_bytes("r") == sum(profile.kv_bytes_per_token[1:3]) * 256
    assert profile.activation_bytes == middle.hidden_size * {"float32": 4, "bfloat16": 2}[dtype]


def test_moe_flops_count_only_active_experts(tiny_model):
    dense = model_profile(open_model_dir(tiny_model(arch="deepseek_v2", moe=False)))
    info = open_model_dir(tiny_model(arch="deepseek_v2"))
    moe = model_profile(info)
    c = info.config
    h, i_dense, i_moe = c["hidden_size"], c["intermediate_size"], c["moe_intermediate_size"]
    attention = dense.layer_flops[0] - 2 * 3 * h * i_dense  # layer 0 is dense in both
    assert moe.layer_flops[0] == dense.layer_flops[0]
    # Per token a MoE layer runs its gate, the top-k routed experts and the shared one.
    active = c["num_experts_per_tok"] + c["n_shared_experts"]
    expected = attention + 2 * h * c["n_routed_experts"] + 2 * 3 * h * i_moe * active
    assert moe.layer_flops[1] == expected
    # ...while it stores every expert.
    assert moe.layer_bytes[1] > 2 * dense.layer_bytes[1]


@pytest.mark.parametrize("bits", [None, 4])
def test_profile_counts_widened_bytes_for_float32_compute(tiny_model, bits):
    import mlx.core as mx

    info = open_model_dir(tiny_model(arch="qwen3", dtype="bfloat16", quantize=bits))
    profile = model_profile(info, "float32")
    costs = _Costs(profile, context=0)
    for start, end in [(0, 1), (1, 3), (3, 4), (0, 4)]:
        widened = load_slice(info, start, end, compute_dtype="float32")
        assert costs.memory(start, end) == widened.weight_bytes
        assert widened.activation_dtype == mx.float32
    assert profile.activation_bytes == int(info.config["hidden_size"]) * 4
    assert profile.weight_bytes > model_profile(info).weight_bytes
