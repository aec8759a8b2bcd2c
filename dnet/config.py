"""Settings: one table of options (``OPTIONS``) from which each command's flags,
``DNET_*`` environment variables, defaults and ``--help`` come. Read once (a flag
that was given > the environment > the default; a given ``0`` counts) and passed
down as frozen values.

This is the only module that reads the environment.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)

PEER, CONSOLE, GENERATE = "dnet-peer", "dnet-console", "dnet-generate"
ALL = (PEER, CONSOLE, GENERATE)


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


def whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    value = whole(text)
    if value < 1:
        raise ValueError(f"{value} is not a positive number")
    return value


def port(text: str) -> int:
    value = whole(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a port")
    return value


def path(text: str) -> Path:
    return Path(text).expanduser()


def switch(text: str) -> bool:
    """``0``/``false``/``no``/``off`` turn a switch off; anything else on."""
    return text.strip().lower() not in ("0", "false", "no", "off", "")


def _home(env: Mapping[str, str], xdg: str, fallback: str) -> Path:
    return Path(env.get(xdg) or Path.home() / fallback) / "dnet"


def default_state_dir(env: Mapping[str, str]) -> Path:
    if "DNET_STATE_DIR" in env:
        return Path(env["DNET_STATE_DIR"]).expanduser()
    return _home(env, "XDG_STATE_HOME", ".local/state")


def default_cache_dir(env: Mapping[str, str]) -> Path:
    if "DNET_CACHE_DIR" in env:
        return Path(env["DNET_CACHE_DIR"]).expanduser()
    return _home(env, "XDG_CACHE_HOME", ".cache")


@attrs.frozen
class Option:
    """One setting. ``flag`` (None: environment only) is ``--name`` for a value,
    ``--no-name`` for a switch that turns it off; ``parse`` reads a flag's or the
    environment's text; ``default`` is a value or a function of the environment."""

    name: str
    help: str
    commands: tuple[str, ...]
    flag: str | None = None
    env: str | None = None
    default: Any = None
    parse: Callable[[str], Any] = str
    action: str = "value"  # value | off (a --no-… switch) | on | append
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    defaults: Mapping[str, Any] = attrs.field(factory=dict)  # per command

    def default_for(self, command: str, env: Mapping[str, str]) -> Any:
        value = self.defaults.get(command, self.default)
        return value(env) if callable(value) else value


_KEY_FILE = "file holding the cluster key (hex); DNET_CLUSTER_KEY also works"
OPTIONS: tuple[Option, ...] = (
    # dnet-console
    Option("headless", "no dashboard: just the head and API", (CONSOLE,), "--headless", action="on", default=False),
    Option("demo", "start two local peers that split a model (default: SmolLM2-135M-Instruct) and load it (peers stopped on exit)", (CONSOLE,), "--demo", action="on", default=False),
    Option("connect", "attach the dashboard to a running head", (CONSOLE,), "--connect", metavar="URL"),
    Option("http_host", "API address (default 127.0.0.1)", (CONSOLE,), "--http-host", "DNET_HTTP_HOST", "127.0.0.1"),
    Option("http_port", "API port (default 8080; 0 = any free port)", (CONSOLE,), "--http-port", "DNET_HTTP_PORT", 8080, port),
    Option("peers", "a peer to use (repeatable)", (CONSOLE,), "--peer", action="append", metavar="HOST:PORT", default=()),
    Option("peers_file", "a file of peer addresses, one per line", (CONSOLE,), "--peers-file", "DNET_PEERS_FILE", parse=path),
    Option("interfaces", "browse mDNS on this address (repeatable; default: every non-loopback IPv4)", (CONSOLE,), "--interface", action="append", metavar="IPV4", default=()),
    Option("api_key", "require 'Authorization: Bearer KEY' on /v1 (visible in ps: prefer --api-key-file)", (CONSOLE,), "--api-key", "DNET_API_KEY"),
    Option("api_key_file", "file holding the API key", (CONSOLE,), "--api-key-file", "DNET_API_KEY_FILE", parse=path),
    Option("allowed_hosts", "another name the head answers to in the Host header (repeatable; IP addresses, loopback and this machine's names always work)", (CONSOLE,), "--allowed-host", action="append", metavar="NAME", default=()),
    Option("max_body", "largest request body the API reads (default 4MiB)", (CONSOLE,), "--max-body", "DNET_MAX_BODY", 4 << 20, parse_size, metavar="SIZE"),
    Option("cors_origin", "let browser apps from ORIGIN (or *) call the API (default: none)", (CONSOLE,), "--cors-origin", "DNET_CORS_ORIGIN", metavar="ORIGIN"),
    Option("max_concurrent", "requests served at once; more get 429 (default 64)", (CONSOLE,), "--max-concurrent", "DNET_MAX_CONCURRENT", 64, positive_int),
    Option("context", "context length to place for (default 4096)", (CONSOLE,), "--context", "DNET_CONTEXT", 4096, positive_int),
    Option("compute_dtype", "widen weights at load (float32: CPUs' fast path; default: as stored)", (CONSOLE,), "--compute-dtype", "DNET_COMPUTE_DTYPE", choices=("float32", "float16", "bfloat16")),
    Option("decode_lanes", "batches of running requests kept in flight around the ring (default: one per machine of the ring)", (CONSOLE,), "--decode-lanes", "DNET_DECODE_LANES", parse=positive_int, metavar="N"),
    Option("wait_peers_s", "seconds to wait for peers before loading --model", (CONSOLE,), env="DNET_WAIT_PEERS", default=30.0, parse=float),
    # dnet-peer
    Option("host", "address to listen on (default 127.0.0.1)", (PEER,), "--host", "DNET_HOST", "127.0.0.1"),
    Option("port", "port to listen on (default 0: any free port)", (PEER,), "--port", "DNET_PORT", 0, port),
    Option("name", "a human name for this peer (default: the host name)", (PEER,), "--name", "DNET_NAME", lambda env: socket.gethostname()),
    Option("max_memory", "memory this peer offers for a model's weights and KV cache, e.g. 512MiB or 2GiB (default: what the machine has free)", (PEER,), "--max-memory", "DNET_MAX_MEMORY", parse=parse_size, metavar="SIZE"),
    Option("models_dir", "a directory of models on this machine: its copies are used instead of fetching, and fetched weights are kept in it (default: fetched weights in the state dir)", (PEER,), "--models-dir", "DNET_MODELS_DIR", parse=path, metavar="DIR"),
    Option("max_disk", "disk this peer's fetched weights may take, e.g. 20GiB; models not loaded are evicted, least recently used first (default: no limit)", (PEER,), "--max-disk", "DNET_MAX_DISK", parse=parse_size, metavar="SIZE"),
    Option("request_idle_timeout_s", "seconds before an idle request's KV cache is freed", (PEER,), env="DNET_REQUEST_IDLE_TIMEOUT", default=600.0, parse=float),
    # shared
    Option("model", "prepare and load this model at start: a directory, a .gguf file, a cached HF repo id, or smollm2-135m", (CONSOLE,), "--model", "DNET_MODEL"),
    Option("model", "model directory, .gguf file, cached HF repo id, or smollm2-135m (the default)", (GENERATE,), "--model", "DNET_MODEL"),
    Option("state_dir", "where the identity and cluster keys live (default ~/.local/state/dnet)", (PEER, CONSOLE), "--state-dir", "DNET_STATE_DIR", default_state_dir, path),
    Option("cluster_key_file", _KEY_FILE, (PEER, CONSOLE), "--cluster-key-file", "DNET_CLUSTER_KEY_FILE", parse=path),
    Option("cluster_key", "the cluster key, hex (overrides key files)", (PEER, CONSOLE), env="DNET_CLUSTER_KEY"),
    Option("mdns", "do not advertise or look for peers over mDNS", (PEER, CONSOLE), "--no-mdns", "DNET_MDNS", True, switch, action="off"),
    Option("use_openblas", "keep MLX's bundled BLAS", (PEER, GENERATE), "--no-openblas", "DNET_OPENBLAS", True, switch, action="off"),
    Option("use_skinny_kernel", "decode's skinny products to dnet's kernel (0: to OpenBLAS too)", ALL, env="DNET_SKINNY", default=True, parse=switch),
    Option("use_quant_kernel", "decode's quantized products to dnet's kernel (0: to MLX's own)", ALL, env="DNET_QUANT_KERNEL", default=True, parse=switch),
    Option("cache_dir", "where generated models and built kernels live", ALL, env="DNET_CACHE_DIR", default=default_cache_dir, parse=path),
    Option("log_level", "DEBUG, INFO (default), WARNING", ALL, "--log-level", "DNET_LOG_LEVEL", "INFO", str.upper, defaults={GENERATE: "WARNING"}),
    # dnet-generate
    Option("slices", "how many slices to cut the model into (default 2)", (GENERATE,), "--slices", default=2, parse=positive_int),
    Option("prompt", "the user message", (GENERATE,), "--prompt", default="Tell me a story about a fox and a crow."),
    Option("max_tokens", "new tokens to generate (default 48)", (GENERATE,), "--max-tokens", default=48, parse=positive_int),
    Option("temperature", "0 is greedy (default)", (GENERATE,), "--temperature", default=0.0, parse=float),
    Option("top_p", "nucleus sampling (default 1: off)", (GENERATE,), "--top-p", default=1.0, parse=float),
    Option("top_k", "sample from the k most likely (default 0: off)", (GENERATE,), "--top-k", default=0, parse=whole),
    Option("seed", "sampling seed", (GENERATE,), "--seed", parse=whole),
    Option("prefill_chunk", "prompt tokens per prefill step (default 2048)", (GENERATE,), "--prefill-chunk", default=2048, parse=positive_int),
)  # fmt: skip


class SettingsError(ValueError):
    """An environment variable that does not parse."""


def build_parser(command: str, description: str) -> argparse.ArgumentParser:
    """``command``'s flags and ``--help``, from ``OPTIONS``."""
    p = argparse.ArgumentParser(prog=command, description=description)
    for o in OPTIONS:
        if command not in o.commands or o.flag is None:
            continue
        text = f"{o.help} [{o.env}]" if o.env else o.help
        if o.action in ("on", "off"):
            p.add_argument(o.flag, dest=o.name, action="store_true", default=None, help=text)
        else:
            p.add_argument(
                o.flag,
                dest=o.name,
                type=_argparse_type(o.parse),
                action="append" if o.action == "append" else "store",
                metavar=o.metavar,
                choices=o.choices,
                help=text,
            )
    return p


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def resolve(command: str, args: object, env: Mapping[str, str]) -> dict[str, Any]:
    """Every option of ``command``: its flag if given, else its environment
    variable, else its default.

    Raises:
        SettingsError: an environment variable that does not parse.
    """
    values: dict[str, Any] = {}
    for o in OPTIONS:
        if command not in o.commands:
            continue
        given = getattr(args, o.name, None)
        if given is not None:
            value = {"off": False, "on": True}.get(o.action, given)
            values[o.name] = tuple(value) if o.action == "append" else value
        elif o.env is not None and env.get(o.env, "") != "":
            try:
                values[o.name] = o.parse(env[o.env])
            except ValueError as exc:
                raise SettingsError(f"{o.env}={env[o.env]!r}: {exc}") from None
        else:
            values[o.name] = o.default_for(command, env)
    return values


def _from(cls: Any, command: str, args: object, env: Mapping[str, str] | None) -> Any:
    env = os.environ if env is None else env
    values = resolve(command, args, env)
    fields = {f.name for f in attrs.fields(cls)}
    extra = {"openblas_thread_timeout": None if "OPENBLAS_THREAD_TIMEOUT" in env else 20}
    return cls(**{k: v for k, v in {**values, **extra}.items() if k in fields})


@attrs.frozen
class RuntimeSettings:
    """What every process that runs MLX reads: the BLAS it loads, the decode
    kernel switch, and where built kernels and generated models are cached."""

    use_openblas: bool = True
    use_skinny_kernel: bool = True
    use_quant_kernel: bool = True
    cache_dir: Path = Path(".")
    # None: leave OpenBLAS's own setting (the user set OPENBLAS_THREAD_TIMEOUT).
    openblas_thread_timeout: int | None = 20

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RuntimeSettings:
        return _from(cls, GENERATE, None, env)


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
    use_skinny_kernel: bool
    use_quant_kernel: bool
    cache_dir: Path
    log_level: str

    @classmethod
    def from_args(cls, args: object, env: Mapping[str, str] | None = None) -> GenerateSettings:
        return _from(cls, GENERATE, args, env)


@attrs.frozen
class PeerSettings:
    """Settings of ``dnet-peer``."""

    host: str = "127.0.0.1"
    port: int = 0
    name: str = ""
    state_dir: Path = Path(".")
    cluster_key_file: Path | None = None
    cluster_key: str | None = None
    mdns: bool = True
    request_idle_timeout_s: float = 600.0
    max_memory: int | None = None  # bytes this peer offers for weights and KV; None: what is free
    models_dir: Path | None = None  # copies of models; fetched weights kept here
    max_disk: int | None = None  # bytes the fetched weights may take
    use_openblas: bool = True
    use_skinny_kernel: bool = True
    use_quant_kernel: bool = True
    cache_dir: Path = Path(".")
    openblas_thread_timeout: int | None = 20
    log_level: str = "INFO"

    @classmethod
    def from_args(cls, args: object, env: Mapping[str, str] | None = None) -> PeerSettings:
        return _from(cls, PEER, args, env)


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
    api_key_file: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_body: int = 4 << 20
    cors_origin: str | None = None
    max_concurrent: int = 64
    context: int = 4096
    compute_dtype: str | None = None
    decode_lanes: int | None = None  # None: one per machine of the ring
    wait_peers_s: float = 30.0
    cache_dir: Path = Path(".")
    log_level: str = "INFO"

    @classmethod
    def from_args(cls, args: object, env: Mapping[str, str] | None = None) -> ConsoleSettings:
        return _from(cls, CONSOLE, args, env)
