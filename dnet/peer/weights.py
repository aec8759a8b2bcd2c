"""The weights a peer holds, by content: ``<root>/<model id>/<file>``, each file
sparse (only the spans this peer's slices read) or a link to a copy of it found on
this machine, and ``have.json``, the spans verified there with their hashes.

A load names spans by hash. Whatever is missing, or no longer matches, comes from
the first place that has it: a local copy (the HF cache, ``--models-dir``), else
each source in turn (the hub by range, the head), written straight to disk as it
arrives and checked span by span. An interrupted fetch resumes with the spans still
missing; a second load of the same slice fetches nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from pathlib import Path

import attrs
import trio

from dnet.errors import DnetError, InvalidModel, PeerUnavailable
from dnet.protocol.messages import FileSpans, HubSource, Span

log = logging.getLogger(__name__)

MODEL_ID = re.compile(r"^dm[0-9a-f]{40}$")
MAX_FILE_BYTES = 1 << 40
HASH_BLOCK = 8 << 20

Key = tuple[str, int, int]  # a span: (file, begin, end)
Sink = Callable[[bytes], Awaitable[None]]
# Bytes [begin, end) of a model file, in order, to a sink.
Fetch = Callable[[str, int, int, Sink], Awaitable[None]]
Progress = Callable[[str, int, int, float], None]  # (source, done, total, bytes/s)
MAX_CANDIDATES = 16
MAX_RUN = 256 << 20
SAVE_EVERY_S = 0.25  # have.json while a fetch runs: what a kill -9 may cost


@attrs.frozen
class Source:
    """Where spans can be fetched from, by name (``hub``, ``head``)."""

    name: str
    fetch: Fetch


class FetchFailed(DnetError):
    code = "fetch_failed"


def _check(model_id: str, files: Sequence[FileSpans]) -> None:
    """Raises:
    InvalidModel: names or ranges no model has (a peer writes only inside its store).
    """
    if not MODEL_ID.match(model_id):
        raise InvalidModel(f"{model_id!r} is not a model id")
    if not files:
        raise InvalidModel("a slice must name the spans of the model files it reads")
    for f in files:
        if Path(f.name).name != f.name or f.name in ("", ".", "..") or f.name == "have.json":
            raise InvalidModel(f"{f.name!r} is not a model file name")
        if not 0 < f.size <= MAX_FILE_BYTES:
            raise InvalidModel(f"{f.name}: a size of {f.size} bytes")
        for s in f.spans:
            if not 0 <= s.begin <= s.end <= f.size:
                raise InvalidModel(f"{f.name}: a span [{s.begin}, {s.end}) outside the file")


def hash_range(path: Path, begin: int, end: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(begin)
        left = end - begin
        while left and (block := f.read(min(left, HASH_BLOCK))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


class WeightStore:
    """Spans of models by id under ``root``. ``local_dirs`` and the HF cache
    (``hf_cache``) are searched for copies of a model's files: a copy whose spans
    match the manifest is linked into the store instead of fetched."""

    def __init__(
        self, root: Path, local_dirs: Sequence[Path] = (), hf_cache: Path | None = None
    ) -> None:
        self.root = root
        self.local_dirs = tuple(local_dirs)
        self.hf_cache = hf_cache
        self.fetched_bytes = 0  # over the network, over this process's life
        self.by_source: dict[str, int] = {}  # bytes each source gave, same

    def _have(self, directory: Path) -> dict[Key, str]:
        try:
            return {
                (n, int(b), int(e)): str(h)
                for n, b, e, h in json.loads((directory / "have.json").read_text())
            }
        except (OSError, ValueError, TypeError):
            return {}

    def run_path(self, model_id: str, name: str, begin: int, end: int) -> Path | None:
        """The file to read ``[begin, end)`` of ``name`` from, if that is a run of
        spans this store verified (for serving another peer), else None."""
        if not MODEL_ID.match(model_id):
            return None
        directory = self.root / model_id
        held = sorted((b, e) for n, b, e in self._have(directory) if n == name)
        inside = [(b, e) for b, e in held if begin <= b and e <= end]
        if not inside or inside[0][0] != begin or inside[-1][1] != end:
            return None
        if any(b2 - e1 > 64 for (_, e1), (b2, _) in itertools.pairwise(inside)):
            return None
        path = directory / name
        return path if path.parent == directory and path.is_file() else None

    def held(self, model_id: str) -> tuple[Key, ...]:
        """The spans of ``model_id`` verified when last loaded (for planning)."""
        if not MODEL_ID.match(model_id):
            return ()
        return tuple(sorted(self._have(self.root / model_id)))

    def _save(self, directory: Path, have: dict[Key, str]) -> None:
        tmp = directory / f"have.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(sorted([*k, h] for k, h in have.items())))
        tmp.replace(directory / "have.json")

    async def ensure(
        self,
        model_id: str,
        files: Sequence[FileSpans],
        sources: Sequence[Source],
        *,
        hub: HubSource | None = None,
        headers_only: bool = False,
        progress: Progress | None = None,
    ) -> Path:
        """The directory holding every span of ``files`` (``headers_only``: just the
        headers and small files), verified; what was missing or corrupt is taken from
        a local copy, else fetched from ``sources`` in order.

        Raises:
            InvalidModel, FetchFailed
        """
        _check(model_id, files)
        directory = self.root / model_id
        await trio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
        have = self._have(directory)
        missing: dict[str, list[Span]] = {}
        for f in files:
            await trio.to_thread.run_sync(_make_room, directory / f.name, f, have)
            for span in f.spans:
                if headers_only and span.name:
                    continue
                if not await self._verified(directory / f.name, f.name, span, have):
                    missing.setdefault(f.name, []).append(span)
        if not missing:
            return directory
        await trio.to_thread.run_sync(self._save, directory, have)
        tracker = _Tracker(sum(s.end - s.begin for v in missing.values() for s in v), progress)
        for f in files:
            spans = missing.get(f.name)
            if spans and not await self._link_copy(directory, f, spans, hub, have, tracker):
                await self._fetch_file(directory, f, spans, sources, have, tracker)
        return directory

    async def _verified(self, path: Path, name: str, span: Span, have: dict[Key, str]) -> bool:
        key = (name, span.begin, span.end)
        known = have.get(key)
        if known is None or (span.sha256 and known != span.sha256):
            have.pop(key, None)
            return False
        if await trio.to_thread.run_sync(hash_range, path, span.begin, span.end) == known:
            return True
        log.warning("%s of %s changed on disk: fetching it again", span, name)
        del have[key]
        return False

    # -- local copies ------------------------------------------------------------

    def candidates(self, f: FileSpans, hub: HubSource | None) -> list[Path]:
        """Files on this machine that may be a copy of ``f``: same name and size, in
        the HF cache (that repo's snapshots first) or under ``local_dirs``."""
        patterns: list[tuple[Path, str]] = []
        if self.hf_cache is not None:
            if hub is not None:
                repo = "models--" + hub.repo_id.replace("/", "--")
                patterns.append((self.hf_cache, f"{repo}/snapshots/*/{f.name}"))
            patterns.append((self.hf_cache, f"models--*/snapshots/*/{f.name}"))
        for d in self.local_dirs:
            patterns += [(d, f.name), (d, f"*/{f.name}"), (d, f"*/*/{f.name}")]
        found: dict[Path, Path] = {}
        store = self.root.resolve()
        for base, pattern in patterns:
            for path in sorted(base.glob(pattern)):
                with suppress(OSError):
                    real = path.resolve()
                    if real.is_relative_to(store) or real in found.values():
                        continue
                    if real.is_file() and real.stat().st_size == f.size:
                        found[path] = real
                if len(found) >= MAX_CANDIDATES:
                    return list(found.values())
        return list(found.values())

    async def _link_copy(
        self,
        directory: Path,
        f: FileSpans,
        spans: list[Span],
        hub: HubSource | None,
        have: dict[Key, str],
        tracker: _Tracker,
    ) -> bool:
        """Link the first copy of ``f`` whose ``spans`` match into the store."""
        for copy in await trio.to_thread.run_sync(self.candidates, f, hub):
            hashes = await trio.to_thread.run_sync(_copy_hashes, copy, f, spans)
            if hashes is None:
                continue
            path = directory / f.name
            link = path.with_name(f"{f.name}.{os.getpid()}.link")
            with suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(copy)
            link.replace(path)
            for key in [k for k in have if k[0] == f.name]:
                del have[key]
            have.update({(f.name, s.begin, s.end): h for s, h in zip(spans, hashes, strict=True)})
            await trio.to_thread.run_sync(self._save, directory, have)
            n = sum(s.end - s.begin for s in spans)
            self.by_source["local copy"] = self.by_source.get("local copy", 0) + n
            tracker.add("local copy", n)
            log.info("using the copy of %s at %s", f.name, copy)
            return True
        return False

    # -- fetching ----------------------------------------------------------------

    async def _fetch_file(
        self,
        directory: Path,
        f: FileSpans,
        spans: list[Span],
        sources: Sequence[Source],
        have: dict[Key, str],
        tracker: _Tracker,
    ) -> None:
        path = directory / f.name
        if path.is_symlink():  # a copy that lacks these spans' proof: never write to it
            await trio.to_thread.run_sync(_unlink_copy, path, f, have)
        for run in _runs(spans):
            errors = []
            for source in sources:
                try:
                    await self._pull(directory, f.name, run, source, have, tracker)
                except (FetchFailed, PeerUnavailable, OSError) as exc:
                    message = exc.message if isinstance(exc, DnetError) else str(exc)
                    errors.append(f"{source.name}: {message}")
                    log.info("fetching %s from %s failed: %s", f.name, source.name, message)
                if not run:
                    break
            if run:
                raise FetchFailed(
                    f"no source gave bytes [{run[0].begin}, {run[-1].end}) of {f.name}: "
                    + ("; ".join(errors) or "none was offered")
                )

    async def _pull(
        self,
        directory: Path,
        name: str,
        run: list[Span],
        source: Source,
        have: dict[Key, str],
        tracker: _Tracker,
    ) -> None:
        """Fetch the contiguous ``run`` from ``source``, taking each span off it as
        it arrives whole and matches its hash (so a later source, or a later load,
        goes on from there).

        Raises:
            FetchFailed, PeerUnavailable, OSError
        """
        saved = time.monotonic()
        writer = _RunWriter(directory / name, run)

        async def sink(data: bytes) -> None:
            nonlocal saved
            if writer.pos + len(data) > writer.end:
                raise FetchFailed(f"{source.name} sent more of {name} than was asked")
            whole = await trio.to_thread.run_sync(writer.write, data)
            self.fetched_bytes += len(data)
            self.by_source[source.name] = self.by_source.get(source.name, 0) + len(data)
            tracker.add(source.name, len(data))
            for span, found in whole:
                if span.sha256 and found != span.sha256:
                    raise FetchFailed(
                        f"bytes [{span.begin}, {span.end}) of {name} from {source.name} "
                        "do not match their hash"
                    )
                have[(name, span.begin, span.end)] = found
                run.remove(span)
            if time.monotonic() - saved > SAVE_EVERY_S:
                saved = time.monotonic()
                await trio.to_thread.run_sync(self._save, directory, have)

        try:
            await source.fetch(name, writer.begin, writer.end, sink)
        finally:
            writer.close()
            await trio.to_thread.run_sync(self._save, directory, have)
        if run:
            raise FetchFailed(f"{source.name} stopped at byte {writer.pos} of {name}")


class _RunWriter:
    """Writes a run of contiguous spans as its bytes come, hashing each span (the
    bytes between spans, GGUF's padding, are written and not hashed)."""

    def __init__(self, path: Path, run: Sequence[Span]) -> None:
        self.spans = list(run)
        self.begin = self.pos = run[0].begin
        self.end = run[-1].end
        self.digest = hashlib.sha256()
        self.fd = os.open(path, os.O_WRONLY)

    def write(self, data: bytes) -> list[tuple[Span, str]]:
        """Write ``data`` at the current position; the spans it completed."""
        os.pwrite(self.fd, data, self.pos)
        view, off, whole = memoryview(data), 0, []
        while off < len(data) and self.spans:
            span, at = self.spans[0], self.pos + off
            if at < span.begin:
                off = min(len(data), span.begin - self.pos)
                continue
            n = min(len(data) - off, span.end - at)
            self.digest.update(view[off : off + n])
            off += n
            if self.pos + off == span.end:
                whole.append((self.spans.pop(0), self.digest.hexdigest()))
                self.digest = hashlib.sha256()
        self.pos += len(data)
        return whole

    def close(self) -> None:
        os.close(self.fd)


def _runs(spans: Sequence[Span]) -> list[list[Span]]:
    """``spans`` (in file order) as runs to fetch in one request each: contiguous
    but for a gap of a few bytes (alignment), at most ``MAX_RUN`` bytes."""
    runs: list[list[Span]] = []
    for span in sorted(spans, key=lambda s: s.begin):
        last = runs[-1] if runs else None
        if last and span.begin - last[-1].end <= 64 and span.end - last[0].begin <= MAX_RUN:
            last.append(span)
        else:
            runs.append([span])
    return runs


def _make_room(path: Path, f: FileSpans, have: dict[Key, str]) -> None:
    """A sparse file of ``f``'s size at ``path`` (holes where other slices' bytes
    go), unless one is there; a file of another size is replaced, its spans
    forgotten."""
    if path.exists() and path.stat().st_size == f.size:
        return
    if path.is_symlink():
        path.unlink()
    with path.open("wb") as out:
        out.truncate(f.size)
    for key in [k for k in have if k[0] == f.name]:
        del have[key]


def _unlink_copy(path: Path, f: FileSpans, have: dict[Key, str]) -> None:
    """Put a sparse file of the store in place of the link at ``path``, holding the
    spans verified in the linked copy."""
    tmp = path.with_name(f"{f.name}.{os.getpid()}.tmp")
    with path.open("rb") as copy, tmp.open("wb") as out:
        out.truncate(f.size)
        for name, begin, end in have:
            if name == f.name:
                copy.seek(begin)
                out.seek(begin)
                left = end - begin
                while left and (block := copy.read(min(left, HASH_BLOCK))):
                    out.write(block)
                    left -= len(block)
    tmp.replace(path)


def _copy_hashes(copy: Path, f: FileSpans, spans: Sequence[Span]) -> list[str] | None:
    """The hashes of ``spans`` in ``copy``, if each matches the manifest: by its own
    hash, or (a span whose hash the manifest lacks) by the copy being the HF
    cache's blob of the file's hash."""
    if any(not s.sha256 for s in spans):
        # Spans the manifest has no hash of: the copy must be the file the hub
        # names by its hash (HF's cache names blobs so; else hash it whole).
        if not f.sha256:
            return None
        if copy.name != f.sha256:
            try:
                if hash_range(copy, 0, f.size) != f.sha256:
                    return None
            except OSError:
                return None
    hashes = []
    for span in spans:
        try:
            found = hash_range(copy, span.begin, span.end)
        except OSError:
            return None
        if span.sha256 and found != span.sha256:
            return None
        hashes.append(found)
    return hashes


class _Tracker:
    """Bytes of one load arriving, for ``FetchProgress``: at most 4 reports a second."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress
        self.source, self.source_done, self.source_started = "", 0, time.monotonic()
        self.reported = 0.0

    def add(self, source: str, n: int) -> None:
        now = time.monotonic()
        if source != self.source:
            self.source, self.source_done, self.source_started = source, 0, now
        self.done += n
        self.source_done += n
        if self.progress is not None and (now - self.reported > 0.25 or self.done >= self.total):
            self.reported = now
            rate = self.source_done / max(now - self.source_started, 1e-3)
            self.progress(source, self.done, self.total, rate)
