"""The head's view of a hub model it has no copy of: a stub made from the small
files and the weights' headers (read by range), once per commit."""

from __future__ import annotations

import shutil

import pytest

from dnet.errors import InvalidModel, ModelNotFound
from dnet.models.gguf import header_end, read_header
from dnet.models.hub import MARKER, hub_model, repo_ref
from dnet.models.manifest import build_manifest
from dnet.models.model_dir import open_model_dir

from ..hub_standin import COMMIT, StandInHub
from .gguf_files import write_gguf


def test_repo_refs():
    assert repo_ref("org/name") == ("org/name", None)
    assert repo_ref("org/name/file.gguf") == ("org/name", "file.gguf")
    for not_one in ("./org/name", "/abs/path", "~/x/y", "org", "org//x", "a/b/c", "org/name/"):
        assert repo_ref(not_one) is None


def test_a_gguf_header_from_a_prefix(tiny_model, tmp_path):
    path = write_gguf(tiny_model(arch="qwen3", layers=2, hidden=64), tmp_path / "t.gguf", "Q8_0")
    data = path.read_bytes()
    start = min(t.offset for t in read_header(path).tensors.values())
    assert header_end(data) == start
    assert header_end(data[:start]) == start  # the header alone is enough
    assert header_end(data[: start // 2]) is None  # too short to say
    assert header_end(data[:3]) is None
    with pytest.raises(InvalidModel, match="GGUF"):
        header_end(b"NOPE" + data[4:start])


def test_a_stub_holds_headers_and_small_files_made_once(tiny_model, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model(arch="qwen3", layers=4, hidden=128), repo)
    with StandInHub({"org/tiny": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        stub = hub_model("org/tiny", tmp_path / "cache")
        assert stub.name == COMMIT and (stub / MARKER).is_file()
        weights = stub / "model.safetensors"
        assert weights.stat().st_size == (repo / "model.safetensors").stat().st_size
        assert weights.stat().st_blocks * 512 < 256 << 10  # sparse: the header only
        assert hub.sent["model.safetensors"] < 64 << 10
        assert (stub / "tokenizer.json").read_bytes() == (repo / "tokenizer.json").read_bytes()
        # The same tensors, layers and config as the real files; no tensor hashes.
        real, seen = open_model_dir(repo), open_model_dir(stub)
        assert seen.config == real.config and seen.tensors.keys() == real.tensors.keys()
        manifest = build_manifest(seen)
        assert manifest.hub is not None and manifest.hub.revision == COMMIT
        assert any(not s.sha256 for f in manifest.files for s in f.spans)  # tensors: no hash
        assert manifest.model_id != build_manifest(real).model_id
        (f,) = [f for f in manifest.files if f.name == "model.safetensors"]
        assert len(f.sha256) == 64
        # Made once per commit: a second call asks the hub only which commit is newest.
        before = len(hub.requests)
        assert hub_model("org/tiny", tmp_path / "cache") == stub
        assert [r[1] for r in hub.requests[before:]] == ["/api/models/org/tiny"]
        with pytest.raises(ModelNotFound, match="the hub has no 'org/other'"):
            hub_model("org/other", tmp_path / "cache")
    # With the hub out of reach, the stub made before serves.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert hub_model("org/tiny", tmp_path / "cache") == stub
    with pytest.raises(ModelNotFound, match="the hub cannot give it"):
        hub_model("org/other", tmp_path / "cache")
