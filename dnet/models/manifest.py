"""A model identified by its content: a manifest of its files, each cut into spans
(a file's header, each tensor's bytes, a small file whole) with their SHA-256, and a
model id that is the hash of it all.

The manifest is what a peer is to be told to load (issue 17): the spans of its
slice's tensors, exactly, each checkable wherever it comes from (its own cache, a
copy on its disk, the hub, the head), and never a path to open. Two files with the
same name and other bytes have other ids; the same bytes under another path, the
same.

Building one reads every byte once; ``manifest_for`` keeps it in a cache keyed by
the files' sizes and modification times, so a model is hashed once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import attrs
import cattrs

from dnet.models.gguf import stored_nbytes
from dnet.models.hub import hub_origin, stub_hashes
from dnet.models.model_dir import ModelDir
from dnet.protocol.messages import FileSpans, HubSource, Span

# Small files a head and a peer need besides the weights: config, tokenizer, template.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
)


@attrs.frozen
class Manifest:
    format: str  # safetensors | gguf
    files: tuple[FileSpans, ...]
    hub: HubSource | None = None  # where else the files are (not part of the id)

    @property
    def model_id(self) -> str:
        content = cattrs.unstructure((self.format, self.files))
        data = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return "dm" + hashlib.sha256(data.encode()).hexdigest()[:40]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, name: str) -> FileSpans:
        return next(f for f in self.files if f.name == name)


def _stored_bytes(model: ModelDir, name: str) -> int:
    info = model.tensors[name]
    return stored_nbytes(info.dtype, info.shape) if model.is_gguf else info.nbytes


def _layout(model: ModelDir, path: Path) -> list[tuple[int, int, str]]:
    """(begin, end, tensor name) of a file's header and tensors, in file order."""
    size = path.stat().st_size
    tensors = sorted(
        (t.offset, t.offset + _stored_bytes(model, n), n)
        for n, t in model.tensors.items()
        if t.file == path and t.offset is not None
    )
    if not tensors:
        return [(0, size, "")]
    return [(0, tensors[0][0], ""), *tensors]


def hash_spans(
    path: Path, layout: list[tuple[int, int, str]], stub_sha256: str | None = None
) -> FileSpans:
    """The spans of ``layout`` with their hashes; of a stub (``stub_sha256``, the
    file's hash on the hub), the header's only: its tensors are holes.

    Raises:
    OSError
    """
    spans = []
    with path.open("rb") as f:
        for begin, end, name in layout:
            if stub_sha256 is not None and name:
                spans.append(Span(begin, end, "", name))
                continue
            f.seek(begin)
            digest, left = hashlib.sha256(), end - begin
            while left and (block := f.read(min(left, 8 << 20))):
                digest.update(block)
                left -= len(block)
            spans.append(Span(begin, end, digest.hexdigest(), name))
        size = f.seek(0, 2)
    return FileSpans(path.name, size, tuple(spans), stub_sha256 or "")


def _model_files(model: ModelDir) -> list[Path]:
    if model.is_gguf:
        return [model.path]
    weights = {t.file for t in model.tensors.values()}
    side = [model.path / n for n in SIDE_FILES if (model.path / n).is_file()]
    return sorted(side) + sorted(weights)


def build_manifest(model: ModelDir) -> Manifest:
    """Hash every file of ``model``: each header, tensor and small file (reads all
    of it).

    Raises:
        OSError
    """
    stub = stub_hashes(model.path)
    files = tuple(
        hash_spans(p, _layout(model, p), None if stub is None else stub.get(p.name, ""))
        if stub is not None and p.name in stub
        else hash_spans(p, _layout(model, p))
        for p in _model_files(model)
    )
    return Manifest(model.format, files, hub_origin(model.path))


def manifest_for(model: ModelDir, cache_dir: Path) -> Manifest:
    """``build_manifest``, remembered under ``cache_dir`` while no file of the model
    changes size or modification time."""
    stats = [
        (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in _model_files(model)
    ]
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:32]
    path = cache_dir / "manifests" / f"{key}.json"
    try:
        return cattrs.structure(json.loads(path.read_text()), Manifest)
    except (OSError, ValueError, cattrs.BaseValidationError):
        pass
    manifest = build_manifest(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cattrs.unstructure(manifest)))
    tmp.replace(path)
    return manifest


def slice_prefixes(model: ModelDir, start: int, end: int) -> tuple[str, ...]:
    """Names' prefixes of the tensors a slice of layers ``[start, end)`` reads: its
    layers; the embeddings on the first (it looks rows up in the file) and, when
    tied, the last (its output head); the final norm and head on the last."""
    tied = "lm_head.weight" not in model.tensors
    prefixes = [f"model.layers.{i}." for i in range(start, end)]
    if start == 0 or (end == model.num_layers and tied):
        prefixes.append("model.embed_tokens.")
    if end == model.num_layers:
        prefixes += ["model.norm.", "lm_head."]
    return tuple(prefixes)


def slice_spans(manifest: Manifest, model: ModelDir, start: int, end: int) -> dict[str, list[Span]]:
    """The spans a slice of layers ``[start, end)`` needs, by file: every header and
    small file, and the bytes of the tensors it reads."""
    prefixes = slice_prefixes(model, start, end)
    return {
        f.name: [s for s in f.spans if not s.name or s.name.startswith(prefixes)]
        for f in manifest.files
    }


def slice_files(manifest: Manifest, model: ModelDir, start: int, end: int) -> tuple[FileSpans, ...]:
    """``slice_spans`` as the files a ``LoadSlice`` names."""
    spans = slice_spans(manifest, model, start, end)
    return tuple(
        attrs.evolve(f, spans=tuple(spans[f.name])) for f in manifest.files if spans[f.name]
    )


def bytes_of(spans: dict[str, list[Span]]) -> int:
    """How many bytes those spans hold."""
    return sum(s.end - s.begin for file_spans in spans.values() for s in file_spans)
