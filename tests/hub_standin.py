"""A stand-in for the Hugging Face hub on loopback, for ``HF_ENDPOINT``: the routes
``huggingface_hub`` calls to describe a repo (``/api/models/...``) and to read its
files (``/{repo}/resolve/{revision}/{file}``, HEAD and GET, byte ranges). It counts
the bytes it sends, by file, so a test sees what each client downloaded."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

COMMIT = "c0ffee" + "0" * 34
LFS = (".safetensors", ".gguf")


class StandInHub:
    """Serves ``repos`` (repo id → directory of its files) at one commit. Start with
    ``with StandInHub(...) as hub:``; ``hub.endpoint`` is its address."""

    def __init__(
        self, repos: dict[str, Path], *, ranges: bool = True, bytes_per_s: float | None = None
    ) -> None:
        self.repos = repos
        self.ranges = ranges
        self.bytes_per_s = bytes_per_s  # a slow hub: file bodies go out at this rate
        self.sent: Counter[str] = Counter()  # body bytes sent, by file name
        self.requests: list[tuple[str, str, str]] = []  # (method, path, range)
        self._lock = threading.Lock()
        self._hashes: dict[Path, str] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub._answer(self, body=True)

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StandInHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def _sha256(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._hashes[path]

    def _info(self, repo: str) -> dict[str, Any]:
        files = sorted(p for p in self.repos[repo].iterdir() if p.is_file())
        siblings = []
        for p in files:
            entry: dict[str, Any] = {"rfilename": p.name, "size": p.stat().st_size}
            if p.name.endswith(LFS):
                entry["lfs"] = {
                    "size": p.stat().st_size,
                    "sha256": self._sha256(p),
                    "pointerSize": 134,
                }
            siblings.append(entry)
        return {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings}

    def _answer(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = h.path.split("?")[0]
        with self._lock:
            self.requests.append((h.command, path, h.headers.get("Range", "")))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        if api and api.group(1) in self.repos:
            data = json.dumps(self._info(api.group(1))).encode()
            return self._send(
                h, 200, data if body else b"", {"Content-Type": "application/json"}, len(data)
            )
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not resolve or resolve.group(1) not in self.repos:
            return self._send(h, 404, b"", {"X-Error-Code": "RepoNotFound"}, 0)
        repo, revision, name = resolve.groups()
        file = self.repos[repo] / name
        if revision not in (COMMIT, "main") or not file.is_file():
            return self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound"}, 0)
        size = file.stat().st_size
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{self._sha256(file)}"',
            "Accept-Ranges": "bytes" if self.ranges else "none",
        }
        begin, end, status = 0, size, 200
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", ""))
        if wanted and self.ranges:
            begin = int(wanted.group(1))
            end = min(size, int(wanted.group(2)) + 1) if wanted.group(2) else size
            status = 206
            headers["Content-Range"] = f"bytes {begin}-{end - 1}/{size}"
        if not body:
            return self._send(h, status, b"", headers, end - begin)
        with file.open("rb") as f:
            f.seek(begin)
            data = f.read(end - begin)
        if self.bytes_per_s is None:
            with self._lock:
                self.sent[name] += len(data)
            return self._send(h, status, data, headers, end - begin)
        self._send(h, status, b"", headers, end - begin)
        for at in range(0, len(data), 64 << 10):  # paced, counted as it goes
            piece = data[at : at + (64 << 10)]
            time.sleep(len(piece) / self.bytes_per_s)
            try:
                h.wfile.write(piece)
            except (BrokenPipeError, ConnectionResetError):
                return None
            with self._lock:
                self.sent[name] += len(piece)
        return None

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], length: int
    ) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        if data:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                h.wfile.write(data)
