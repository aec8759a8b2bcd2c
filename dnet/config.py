"""Settings: read once (flags > ``DNET_*`` environment > defaults) and passed down.

This is the only module that reads the environment.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``512MiB``, ``2GiB``, ``1.5G``, ``800MB`` or ``1048576``: binary
    units for ``KiB``/``MiB``/``GiB`` and bare ``K``/``M``/``G``, decimal for
    ``KB``/``MB``/``GB``.

    Raises:
        ValueError: not a positive size.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (e.g. 512MiB, 2GiB, 1.5G)")
    number, unit, binary, byte = match.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    base = 1000 if unit and byte and not binary else 1024
    size = int(float(number) * base**power)
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def default_cache_dir(env: Mapping[str, str]) -> Path:
    if "DNET_CACHE_DIR" in env:
        return Path(env["DNET_CACHE_DIR"]).expanduser()
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dnet"


@attrs.frozen
class GenerateSettings:
    """Settings of ``dnet-generate``, the local sliced generation command."""

    model: str | None
    slices: int
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    prefill_chunk: int
    use_openblas: bool
    cache_dir: Path
    log_level: str

    @classmethod
    def from_args(cls, args: object, env: Mapping[str, str] | None = None) -> GenerateSettings:
        env = os.environ if env is None else env

        def get(name: str) -> Any:
            return getattr(args, name, None)

        return cls(
            model=get("model") or env.get("DNET_MODEL"),
            slices=get("slices") or 2,
            prompt=get("prompt") or "Tell me a story about a fox and a crow.",
            max_tokens=get("max_tokens") or 48,
            temperature=get("temperature") if get("temperature") is not None else 0.0,
            top_p=get("top_p") if get("top_p") is not None else 1.0,
            top_k=get("top_k") or 0,
            seed=get("seed"),
            prefill_chunk=get("prefill_chunk") or 2048,
            use_openblas=not get("no_openblas") and env.get("DNET_OPENBLAS", "1") != "0",
            cache_dir=default_cache_dir(env),
            log_level=(get("log_level") or env.get("DNET_LOG_LEVEL") or "WARNING").upper(),
        )


def default_state_dir(env: Mapping[str, str]) -> Path:
    if "DNET_STATE_DIR" in env:
        return Path(env["DNET_STATE_DIR"]).expanduser()
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dnet"


@attrs.frozen
class PeerSettings:
    """Settings of ``dnet-peer``."""

    host: str = "127.0.0.1"
    port: int = 0
    name: str = ""
    state_dir: Path = Path(".")
    cluster_key_file: Path | None = None
    cluster_key: str | None = None  # DNET_CLUSTER_KEY
    mdns: bool = True
    request_idle_timeout_s: float = 600.0
    max_memory: int | None = None  # bytes this peer offers for weights and KV; None: what is free
    use_openblas: bool = True
    # None: leave OpenBLAS's own setting (the user set OPENBLAS_THREAD_TIMEOUT).
    openblas_thread_timeout: int | None = 20
    log_level: str = "INFO"

    @classmethod
    def from_args(cls, args: object, env: Mapping[str, str] | None = None) -> PeerSettings:
        env = os.environ if env is None else env

        def get(name: str) -> Any:
            return getattr(args, name, None)

        key_file = get("cluster_key_file") or env.get("DNET_CLUSTER_KEY_FILE")
        return cls(
            host=get("host") or env.get("DNET_HOST") or "127.0.0.1",
            port=get("port") if get("port") is not None else int(env.get("DNET_PORT", "0")),
            name=get("name") or env.get("DNET_NAME") or socket.gethostname(),
            state_dir=Path(get("state_dir")).expanduser()
            if get("state_dir")
            else default_state_dir(env),
            cluster_key_file=Path(key_file).expanduser() if key_file else None,
            cluster_key=env.get("DNET_CLUSTER_KEY") or None,
            mdns=not get("no_mdns") and env.get("DNET_MDNS", "1") != "0",
            request_idle_timeout_s=float(env.get("DNET_REQUEST_IDLE_TIMEOUT", "600")),
            max_memory=_size(get("max_memory") or env.get("DNET_MAX_MEMORY")),
            use_openblas=not get("no_openblas") and env.get("DNET_OPENBLAS", "1") != "0",
            openblas_thread_timeout=None if "OPENBLAS_THREAD_TIMEOUT" in env else 20,
            log_level=(get("log_level") or env.get("DNET_LOG_LEVEL") or "INFO").upper(),
        )


def _size(text: str | None) -> int | None:
    return parse_size(text) if text else None


@attrs.frozen
class ConsoleSettings:
    """Settings of ``dnet-console`` (the head, headless or with its dashboard)."""

    headless: bool = False
    demo: bool = False
    connect: str | None = None  # attach the dashboard to a remote head's API
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    peers: tuple[str, ...] = ()
    peers_file: Path | None = None
    mdns: bool = True
    interfaces: tuple[str, ...] = ()  # mDNS browse interfaces; () = every non-loopback IPv4
    model: str | None = None
    state_dir: Path = Path(".")
    cluster_key_file: Path | None = None
    cluster_key: str | None = None
    api_key: str | None = None
    cors_origin: str | None = None
    max_concurrent: int = 64
    context: int = 4096
    compute_dtype: str | None = None
    decode_lanes: int | None = None  # None: one per machine of the ring
    wait_peers_s: float = 30.0
    log_level: str = "INFO"

    @classmethod
    def from_args(cls, args: object, env: Mapping[str, str] | None = None) -> ConsoleSettings:
        env = os.environ if env is None else env

        def get(name: str) -> Any:
            return getattr(args, name, None)

        key_file = get("cluster_key_file") or env.get("DNET_CLUSTER_KEY_FILE")
        peers_file = get("peers_file") or env.get("DNET_PEERS_FILE")
        port = get("http_port")
        return cls(
            headless=bool(get("headless")),
            demo=bool(get("demo")),
            connect=get("connect"),
            http_host=get("http_host") or env.get("DNET_HTTP_HOST") or "127.0.0.1",
            http_port=port if port is not None else int(env.get("DNET_HTTP_PORT", "8080")),
            peers=tuple(get("peer") or ()),
            peers_file=Path(peers_file).expanduser() if peers_file else None,
            mdns=not get("no_mdns") and env.get("DNET_MDNS", "1") != "0",
            interfaces=tuple(get("interface") or ()),
            model=get("model") or env.get("DNET_MODEL"),
            state_dir=Path(get("state_dir")).expanduser()
            if get("state_dir")
            else default_state_dir(env),
            cluster_key_file=Path(key_file).expanduser() if key_file else None,
            cluster_key=env.get("DNET_CLUSTER_KEY") or None,
            api_key=get("api_key") or env.get("DNET_API_KEY") or None,
            cors_origin=get("cors_origin") or env.get("DNET_CORS_ORIGIN") or None,
            max_concurrent=get("max_concurrent") or int(env.get("DNET_MAX_CONCURRENT", "64")),
            context=get("context") or int(env.get("DNET_CONTEXT", "4096")),
            compute_dtype=get("compute_dtype") or env.get("DNET_COMPUTE_DTYPE") or None,
            decode_lanes=get("decode_lanes") or int(env.get("DNET_DECODE_LANES", "0")) or None,
            wait_peers_s=float(env.get("DNET_WAIT_PEERS", "30")),
            log_level=(get("log_level") or env.get("DNET_LOG_LEVEL") or "INFO").upper(),
        )
