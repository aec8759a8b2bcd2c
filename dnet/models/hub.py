"""The Hugging Face hub as a place to read models by byte range, with
``huggingface_hub`` (its endpoint, ``HF_ENDPOINT``; its token; its HTTP session).

The head plans a model it has no copy of from a *stub*: a directory in its cache
holding the small files (config, tokenizer) whole and each weights file sparse, its
header in place and holes where the tensors go, plus ``dnet-hub.json`` naming the
repo, the commit and each file's hash on the hub. ``open_model_dir`` reads a stub
like any model; its manifest leaves the tensors' hashes empty (the head never saw
them), and peers fetch those bytes from the hub by range, each only its slice's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dnet.errors import InvalidModel, ModelNotFound
from dnet.models.model_dir import ModelDir, open_model_dir
from dnet.protocol.messages import HubSource

log = logging.getLogger(__name__)

MARKER = "dnet-hub.json"
# The first read of a GGUF header; doubled (reading only the rest) until it fits.
HEADER_PROBE = 64 << 10
MAX_HEADER = 256 << 20
TIMEOUT_S = 30.0
CHUNK = 1 << 20


def endpoint() -> str:
    """The hub's address: ``HF_ENDPOINT`` as it is now (huggingface_hub reads it once,
    at import), else the library's default."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT


def _url(hub: HubSource, name: str) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(hub.repo_id, name, revision=hub.revision, endpoint=endpoint())


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    return {**build_hf_headers(), "Accept-Encoding": "identity", **(extra or {})}


def read_range(hub: HubSource, name: str, begin: int, end: int) -> bytes:
    """Bytes ``[begin, end)`` of a file of ``hub``, in one request (for headers).

    Raises:
        OSError: the hub refused, is out of reach, or ignored the range.
    """
    out = bytearray()
    for chunk in stream_range(hub, name, begin, end):
        out += chunk
    return bytes(out)


def stream_range(hub: HubSource, name: str, begin: int, end: int) -> Iterator[bytes]:
    """Bytes ``[begin, end)`` of a file of ``hub``, a chunk at a time, by a range
    request (redirects followed; the token is not sent to another host).

    Raises:
        OSError: the hub refused, is out of reach, ignored the range, or sent more or
            fewer bytes than asked.
    """
    from huggingface_hub.utils import get_session

    headers = _headers({"Range": f"bytes={begin}-{end - 1}"})
    got = 0
    try:
        with get_session().stream(
            "GET", _url(hub, name), headers=headers, follow_redirects=True, timeout=TIMEOUT_S
        ) as response:
            if response.status_code != 206 and not (response.status_code == 200 and begin == 0):
                raise OSError(f"the hub answered {response.status_code} for bytes of {name}")
            for chunk in response.iter_bytes(CHUNK):
                if got + len(chunk) > end - begin:
                    if response.status_code == 200:  # no ranges: the rest is not ours
                        chunk = chunk[: end - begin - got]
                    else:
                        raise OSError(f"the hub sent more of {name} than was asked")
                got += len(chunk)
                if chunk:
                    yield chunk
                if got == end - begin:
                    break
    except OSError:
        raise
    except Exception as exc:  # httpx2's and huggingface_hub's own errors
        raise OSError(f"cannot read {name} of {hub.repo_id} from the hub: {exc}") from exc
    if got != end - begin:
        raise OSError(f"the hub sent {got} of {end - begin} bytes of {name}")


def hub_origin(path: Path) -> HubSource | None:
    """The hub repo and commit a model came from: a stub's marker, or a path in the
    HF cache (``models--ORG--NAME/snapshots/COMMIT/...``)."""
    directory = path if path.is_dir() else path.parent
    marker = directory / MARKER
    if marker.is_file():
        data = json.loads(marker.read_text())
        return HubSource(data["repo_id"], data["revision"])
    parts = path.absolute().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return HubSource(part[len("models--") :].replace("--", "/"), parts[i + 2])
    return None


def stub_hashes(path: Path) -> dict[str, str] | None:
    """A stub's files' hashes on the hub (None: not a stub; its files are whole)."""
    directory = path if path.is_dir() else path.parent
    try:
        return dict(json.loads((directory / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError):
        return None


def _repo_files(repo_id: str, revision: str | None) -> tuple[str, dict[str, Any]]:
    """The commit ``revision`` (default: main) names, and the repo's files there.

    Raises:
        ModelNotFound
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi(endpoint=endpoint()).model_info(
            repo_id, revision=revision, files_metadata=True, timeout=TIMEOUT_S
        )
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ModelNotFound(f"the hub has no {repo_id!r}: {_why(exc)}") from None
    except Exception as exc:  # gated, offline, out of reach
        raise HubUnreachable(
            f"{repo_id!r} is not a local model, and the hub cannot give it: {_why(exc)}"
        ) from None
    files = {s.rfilename: s for s in info.siblings or ()}
    if not info.sha:
        raise ModelNotFound(f"the hub named no commit for {repo_id!r}")
    return info.sha, files


class HubUnreachable(ModelNotFound):
    """The hub could not be asked (offline, out of reach, refused)."""


def _newest_stub(directory: Path, repo_id: str) -> Path | None:
    stubs = [d for d in directory.glob("*") if (d / MARKER).is_file()]
    if not stubs:
        return None
    newest = max(stubs, key=lambda d: (d / MARKER).stat().st_mtime)
    log.warning("the hub is out of reach: using %s as it was at commit %s", repo_id, newest.name)
    return newest


def _why(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


def hub_model(repo_id: str, cache_dir: Path, file: str | None = None) -> Path:
    """A stub of ``repo_id`` (``file``: one GGUF file of it) at its newest commit,
    made once per commit under ``cache_dir``. Reads the small files and the weights'
    headers, by range; never a tensor.

    Raises:
        ModelNotFound: the hub has no such repo or file, or cannot be reached.
        InvalidModel: the repo has no weights dnet reads.
    """
    from dnet.models.manifest import SIDE_FILES

    try:
        commit, files = _repo_files(repo_id, None)
    except HubUnreachable:
        known = _newest_stub(cache_dir / "hub" / repo_id.replace("/", "--"), repo_id)
        if known is None or (file is not None and not (known / file).is_file()):
            raise
        return known / file if file else known
    hub = HubSource(repo_id, commit)
    directory = cache_dir / "hub" / repo_id.replace("/", "--") / commit
    if file is not None:
        if file not in files:
            raise ModelNotFound(f"{repo_id} has no {file}")
        weights = [file]
    else:
        weights = sorted(n for n in files if n.endswith(".safetensors") and "/" not in n)
        if not weights:
            raise InvalidModel(f"{repo_id} has no safetensors files at its top level")
    wanted = weights[0] if file else "config.json"
    if (directory / MARKER).is_file() and (directory / wanted).is_file():
        return directory / file if file else directory
    tmp = directory.with_name(f"{commit}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if file is None:
            for name in SIDE_FILES:
                if name in files:
                    (tmp / name).write_bytes(read_range(hub, name, 0, int(files[name].size)))
        hashes = {}
        for name in weights:
            size = int(files[name].size)
            header = _read_header(hub, name, size, gguf=file is not None)
            with (tmp / name).open("wb") as out:
                out.write(header)
                out.truncate(size)  # sparse: the tensors are holes
            lfs = files[name].lfs
            hashes[name] = (lfs.sha256 if lfs else "") or ""
        marker = {"repo_id": repo_id, "revision": commit, "files": hashes}
        (tmp / MARKER).write_text(json.dumps(marker))
        shutil.rmtree(directory, ignore_errors=True)
        tmp.rename(directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelNotFound(f"cannot read {repo_id} from the hub: {exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory / file if file else directory


def _read_header(hub: HubSource, name: str, size: int, *, gguf: bool) -> bytes:
    """A weights file's header (for safetensors: its 8-byte length and JSON).

    Raises:
        OSError, InvalidModel
    """
    if not gguf:
        head = read_range(hub, name, 0, min(8, size))
        if len(head) < 8:
            raise InvalidModel(f"{name} is shorter than a header")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER or 8 + length > size:
            raise InvalidModel(f"{name}: its header claims {length} bytes")
        return head + read_range(hub, name, 8, 8 + length)
    return _read_gguf_header(lambda b, e: read_range(hub, name, b, e), name, size)


def _read_gguf_header(read: Callable[[int, int], bytes], name: str, size: int) -> bytes:
    from dnet.models.gguf import header_end

    have = b""
    want = HEADER_PROBE
    while True:
        have += read(len(have), min(want, size))
        end = header_end(have)
        if end is not None:
            return have[: min(end, len(have))]
        if len(have) >= size or want >= MAX_HEADER:
            raise InvalidModel(f"{name}: no GGUF header within {len(have)} bytes")
        want *= 2


def repo_ref(ref: str) -> tuple[str, str | None] | None:
    """``org/name`` → (repo, None); ``org/name/file.gguf`` → (repo, file); else None."""
    parts = ref.split("/")
    if ref.startswith((".", "/", "~")) or not all(parts):
        return None
    if len(parts) == 2:
        return ref, None
    if len(parts) == 3 and ref.endswith(".gguf"):
        return "/".join(parts[:2]), parts[2]
    return None


def open_model(ref: str | Path, cache_dir: Path) -> ModelDir:
    """``open_model_dir``, and for a repo id with no local copy, a stub of it from
    the hub (see ``hub_model``).

    Raises:
        ModelNotFound, InvalidModel
    """
    try:
        return open_model_dir(ref)
    except ModelNotFound:
        repo = repo_ref(str(ref)) if not Path(str(ref)).expanduser().exists() else None
        if repo is None:
            raise
    return open_model_dir(hub_model(repo[0], cache_dir, repo[1]))
