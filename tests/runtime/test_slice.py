"""Loading slices: only the owned tensors, and clear errors for bad models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

from dnet.errors import (
    InvalidModel,
    LayerRangeError,
    MissingTensor,
    ModelNotFound,
    TensorShapeMismatch,
    UnsupportedArchitecture,
)
from dnet.models.model_dir import open_model_dir, resolve_model
from dnet.runtime.slice import load_slice


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_slice_holds_only_its_parts(tiny_model):
    info = open_model_dir(tiny_model(arch="qwen3"))  # tied embeddings
    first, middle, last = load_slice(info, 0, 1), load_slice(info, 1, 3), load_slice(info, 3, 4)
    assert first.embed is not None and first.norm is None and first.head is None
    assert middle.embed is None and middle.norm is None and middle.head is None
    # Tied: the last slice needs the embedding matrix as its output head.
    assert last.embed is not None and last.norm is not None and last.head is None
    assert [len(s.layers) for s in (first, middle, last)] == [1, 2, 1]

    untied = open_model_dir(tiny_model(arch="deepseek_v2"))
    tail = load_slice(untied, 2, 4)
    assert tail.embed is None and tail.head is not None


def _measure(path, start, end):
    code = (
        "import sys, mlx.core as mx\n"
        "from dnet.runtime.slice import load_slice\n"
        "mx.reset_peak_memory(); before = mx.get_active_memory()\n"
        f"s = load_slice(sys.argv[1], {start}, {end})\n"
        "print(mx.get_active_memory() - before, mx.get_peak_memory(), s.weight_bytes)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    return [int(v) for v in out.stdout.split()]


def test_half_the_layers_costs_at_most_60_percent_of_the_weights(tiny_model):
    path = tiny_model(arch="qwen3", layers=8, hidden=128)
    total = open_model_dir(path).weight_bytes
    # Fresh processes, so the peak belongs to the load alone.
    full_active, _full_peak, _ = _measure(path, 0, 8)
    assert full_active >= 0.95 * total
    for start, end in [(0, 4), (4, 8)]:
        active, peak, weight_bytes = _measure(path, start, end)
        assert active <= 0.6 * total, (start, end, active, total)
        assert peak <= 0.6 * total + 2**20, (start, end, peak, total)
        assert weight_bytes <= 0.6 * total


def test_layer_range_errors(tiny_model):
    info = open_model_dir(tiny_model(arch="qwen3"))
    for start, end in [(-1, 2), (0, 5), (2, 2), (3, 1), (4, 5)]:
        with pytest.raises(LayerRangeError):
            load_slice(info, start, end)


def test_missing_model_and_unknown_architecture(tiny_model, tmp_path):
    with pytest.raises(ModelNotFound):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ModelNotFound):
        resolve_model("no-such-org/no-such-model-dnet-test")
    with pytest.raises(ModelNotFound):
        resolve_model(tmp_path)  # a directory without config.json
    bad = copy_model(tiny_model(arch="qwen3"), tmp_path / "gemma")
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "gemma"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture, match="gemma"):
        load_slice(bad, 0, 2)


def test_missing_tensor_is_named(tiny_model, tmp_path):
    bad = copy_model(tiny_model(arch="qwen3"), tmp_path / "missing")
    weights = mx.load(str(bad / "model.safetensors"))
    del weights["model.layers.2.mlp.up_proj.weight"]
    mx.save_safetensors(str(bad / "model.safetensors"), weights)
    info = open_model_dir(bad)
    load_slice(info, 0, 2)  # slices that do not own layer 2 do not care
    with pytest.raises(MissingTensor, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        load_slice(info, 2, 4)


def test_misshaped_tensor_is_named(tiny_model, tmp_path):
    bad = copy_model(tiny_model(arch="deepseek_v2"), tmp_path / "shape")
    weights = mx.load(str(bad / "model.safetensors"))
    name = "model.layers.1.self_attn.o_proj.weight"
    weights[name] = weights[name][:, :-2]
    mx.save_safetensors(str(bad / "model.safetensors"), weights)
    with pytest.raises(TensorShapeMismatch, match=r"o_proj\.weight"):
        load_slice(bad, 0, 4)


def test_config_that_does_not_build_is_invalid(tiny_model, tmp_path):
    bad = copy_model(tiny_model(arch="qwen3"), tmp_path / "config")
    config = json.loads((bad / "config.json").read_text())
    del config["hidden_size"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidModel):
        load_slice(bad, 0, 4)


def test_truncated_weights_file_is_invalid(tiny_model, tmp_path):
    bad = copy_model(tiny_model(arch="qwen3"), tmp_path / "trunc")
    (bad / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(InvalidModel):
        open_model_dir(bad)


def test_sharded_index_naming_a_missing_file_is_invalid(tiny_model, tmp_path):
    bad = copy_model(tiny_model(arch="qwen3", shards=2), tmp_path / "shards")
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InvalidModel, match="missing"):
        open_model_dir(bad)


def test_unowned_shards_are_never_read(tiny_model, tmp_path):
    """A slice opens only the shard files holding its tensors."""
    src = copy_model(tiny_model(arch="qwen3", shards=4), tmp_path / "shards")
    info = open_model_dir(src)
    owned = {info.tensors[n].file for n in info.tensors if n.startswith("model.layers.0.")}
    owned |= {info.tensors["model.embed_tokens.weight"].file}
    others = {t.file for t in info.tensors.values()} - owned
    assert others, "the test needs a shard that layer 0 does not use"
    # Corrupt every other shard's data after the index was read: loading layer 0
    # must not notice.
    for f in others:
        f.write_bytes(f.read_bytes()[:8])
    load_slice(info, 0, 1)


def test_repo_id_resolves_through_the_hf_cache_only(tiny_model, tmp_path):
    # The layout huggingface_hub writes: refs/main names a snapshot folder.
    repo = tmp_path / "hub" / "models--dnet-test--tiny-qwen3"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_model(arch="qwen3"), repo / "snapshots" / commit)
    path = resolve_model("dnet-test/tiny-qwen3", hf_cache_dir=tmp_path / "hub")
    assert path == repo / "snapshots" / commit
    info = open_model_dir("dnet-test/tiny-qwen3", hf_cache_dir=tmp_path / "hub")
    assert load_slice(info, 0, 2).num_layers == 2
    # Not in the cache: a clear error, and no download attempt.
    with pytest.raises(ModelNotFound, match="download it first"):
        resolve_model("dnet-test/not-cached", hf_cache_dir=tmp_path / "hub")
