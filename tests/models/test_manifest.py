"""Models identified by content: span hashes, model ids, and what a slice needs."""

from __future__ import annotations

import shutil
from pathlib import Path

from dnet.models import manifest as manifests
from dnet.models.manifest import build_manifest, bytes_of, manifest_for, slice_spans
from dnet.models.model_dir import open_model_dir

from .test_gguf import smollm2


def test_the_id_follows_the_bytes_not_the_path(tiny_model, tmp_path):
    source = Path(tiny_model(arch="qwen3", layers=4, hidden=64))
    first = build_manifest(open_model_dir(source))
    assert first == build_manifest(open_model_dir(source))
    copy = tmp_path / "elsewhere"
    shutil.copytree(source, copy)
    assert build_manifest(open_model_dir(copy)).model_id == first.model_id
    weights = sorted(copy.glob("model*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    changed = build_manifest(open_model_dir(copy))
    assert changed.model_id != first.model_id
    old, new = first.file(weights.name).spans, changed.file(weights.name).spans
    differ = [a.name for a, b in zip(old, new, strict=True) if a != b]
    assert differ == [max(old, key=lambda s: s.end).name]  # just that tensor


def test_a_manifest_is_hashed_once_while_its_files_stay(tiny_model, tmp_path, monkeypatch):
    source = tmp_path / "m"
    shutil.copytree(tiny_model(arch="qwen3", layers=2), source)
    model = open_model_dir(source)
    built = []
    real = manifests.build_manifest
    monkeypatch.setattr(manifests, "build_manifest", lambda m: built.append(1) or real(m))
    first = manifest_for(model, tmp_path / "cache")
    assert manifest_for(model, tmp_path / "cache") == first and len(built) == 1
    config = source / "config.json"
    config.write_text(config.read_text() + "\n")  # another size: hashed again
    assert manifest_for(model, tmp_path / "cache").model_id != first.model_id
    assert len(built) == 2


def _check(manifest, model, start, end) -> int:
    """The slice's spans are exactly its tensors (plus headers and small files);
    returns their tensor bytes."""
    spans = slice_spans(manifest, model, start, end)
    prefixes = manifests.slice_prefixes(model, start, end)
    wanted = {n for n in model.tensors if n.startswith(prefixes)}
    got = {s.name for file_spans in spans.values() for s in file_spans if s.name}
    assert got == wanted
    tensor_bytes = sum(manifests._stored_bytes(model, n) for n in wanted)
    headers = bytes_of(spans) - tensor_bytes
    assert headers < 4 << 20  # headers and small files only
    return bytes_of(spans)


def test_a_slice_needs_its_tensors_bytes_and_no_more(tiny_model):
    model = open_model_dir(tiny_model(arch="qwen3", layers=8, hidden=128, tie_embeddings=False))
    manifest = build_manifest(model)
    layers = sum(t.nbytes for n, t in model.tensors.items() if n.startswith("model.layers."))
    first, second = _check(manifest, model, 0, 4), _check(manifest, model, 4, 8)
    assert first < manifest.size - layers / 2 and second < manifest.size - layers / 2


def test_a_gguf_slice(tmp_path):
    model = open_model_dir(smollm2())
    manifest = manifest_for(model, tmp_path)
    n = model.num_layers
    assert manifest.files[0].spans[0].name == ""  # the header first
    for start, end in ((0, n // 2), (n // 2, n)):
        assert _check(manifest, model, start, end) < 0.75 * manifest.size
