"""Entry points: argv → settings → the job. The only place that wires things."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

from dnet.config import (
    GENERATE,
    PEER,
    GenerateSettings,
    PeerSettings,
    SettingsError,
    build_parser,
)
from dnet.errors import DnetError

log = logging.getLogger(__name__)


GENERATE_HELP = (
    "Generate text by running a model as several layer slices in one process "
    "(activations cross every slice boundary as bytes, as they will between peers)."
)
PEER_HELP = (
    "Run a dnet peer: hold a slice of a model's layers and serve it over an "
    "authenticated WebSocket. 'dnet-peer models' lists the models whose weights it "
    "keeps; 'dnet-peer models rm ID...' removes them."
)


def _settings(cls: Any, command: str, help_text: str, argv: list[str] | None) -> Any:
    """Settings from argv and the environment; exits 2 on a bad environment value."""
    args = build_parser(command, help_text).parse_args(argv)
    try:
        return cls.from_args(args)
    except SettingsError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def generate_main(argv: list[str] | None = None) -> int:
    settings = _settings(GenerateSettings, GENERATE, GENERATE_HELP, argv)
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    if settings.use_openblas:
        from dnet.runtime.blas import preload_openblas

        preload_openblas(cache_dir=settings.cache_dir / "native", skinny=settings.use_skinny_kernel)
    from dnet.runtime import qgemv

    qgemv.configure(settings.cache_dir / "native", settings.use_quant_kernel)
    try:
        return _generate(settings)
    except DnetError as exc:
        print(f"dnet-generate: {exc.message}", file=sys.stderr)
        return 2


def _generate(settings: GenerateSettings) -> int:
    from dnet.demo import demo_model
    from dnet.models.model_dir import open_model_dir
    from dnet.models.tokenizer import load_tokenizer
    from dnet.runtime.blas import loaded_blas
    from dnet.runtime.local import even_cuts, generate, load_chain
    from dnet.sampling import SamplingParams

    model = open_model_dir(demo_model(settings.model, settings.cache_dir))
    params = SamplingParams(
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        seed=settings.seed,
    )
    cuts = even_cuts(model.num_layers, settings.slices)
    t0 = time.perf_counter()
    engines = load_chain(model, cuts)
    load_s = time.perf_counter() - t0
    for i, e in enumerate(engines):
        s = e.slice
        extra = " + embeddings" * s.is_first + " + norm, head, sampler" * s.is_last
        print(
            f"slice {i}: layers {s.start}..{s.end - 1}{extra} ({s.weight_bytes / 2**20:.1f} MiB)",
            file=sys.stderr,
        )
    print(
        f"loaded {model.name} ({model.model_type}) in {load_s:.2f}s; BLAS: {loaded_blas() or 'bundled'}",
        file=sys.stderr,
    )
    tokenizer = load_tokenizer(model.path, eos_token_ids=model.config.get("eos_token_id"))
    prompt = tokenizer.chat_prompt([{"role": "user", "content": settings.prompt}])
    print(f"> {settings.prompt}", file=sys.stderr)
    text = tokenizer.stream()
    start = time.perf_counter()
    first_at = None
    n = 0
    for token in generate(
        engines,
        prompt,
        settings.max_tokens,
        params,
        prefill_chunk=settings.prefill_chunk,
        stop_tokens=sorted(tokenizer.eos_token_ids),
    ):
        first_at = first_at or time.perf_counter()
        n += 1
        if token.token_id in tokenizer.eos_token_ids:
            break
        print(text.add(token.token_id), end="", flush=True)
    print(text.finish(), flush=True)
    end = time.perf_counter()
    ttft = (first_at or end) - start
    rate = (n - 1) / (end - first_at) if first_at and n > 1 and end > first_at else 0.0
    print(
        f"[{len(prompt)} prompt tokens, {n} new; first token {ttft * 1000:.0f} ms; {rate:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(generate_main())


def peer_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["models"]:
        return peer_models(argv[1:])
    settings = _settings(PeerSettings, PEER, PEER_HELP, argv)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.use_openblas:
        from dnet.runtime.blas import preload_openblas

        preload_openblas(
            settings.openblas_thread_timeout,
            cache_dir=settings.cache_dir / "native",
            skinny=settings.use_skinny_kernel,
        )
    from dnet.limits import raise_file_limit
    from dnet.runtime import qgemv
    from dnet.runtime.device_profile import return_large_frees

    qgemv.configure(settings.cache_dir / "native", settings.use_quant_kernel)
    raise_file_limit()
    return_large_frees()  # a peer's footprint is what it holds, not what it read through
    import trio

    from dnet.identity import load_cluster_key, load_identity

    try:
        identity = load_identity(settings.state_dir)
        key, key_path, generated = load_cluster_key(
            settings.state_dir, settings.cluster_key_file, settings.cluster_key
        )
    except DnetError as exc:
        print(f"dnet-peer: {exc.message}", file=sys.stderr)
        return 2
    if generated:
        print(
            f"dnet-peer: generated a new cluster key in {key_path}; give the same key to every "
            "peer and head of this cluster (--cluster-key-file or DNET_CLUSTER_KEY)",
            file=sys.stderr,
        )
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_run_peer, settings, identity, key)
    return 0


def peer_models(argv: list[str]) -> int:
    """``dnet-peer models [rm MODEL_ID...] [--state-dir DIR] [--models-dir DIR]``:
    the models this peer has fetched weights of (least recently used first), or
    remove some."""
    from dnet.peer.disk import remove, stored_models

    rest, ids = list(argv), []
    if rest[:1] == ["rm"]:
        rest.pop(0)
        while rest and not rest[0].startswith("-"):
            ids.append(rest.pop(0))
        if not ids:
            print(
                "usage: dnet-peer models rm MODEL_ID... (ids from dnet-peer models)",
                file=sys.stderr,
            )
            return 2
    settings = _settings(PeerSettings, PEER, PEER_HELP, rest)
    root = weights_dir(settings)
    if ids:
        missing = [i for i in ids if not remove(root, i)]
        for i in missing:
            print(f"dnet-peer: no model {i} in {root}", file=sys.stderr)
        return 1 if missing else 0
    models = stored_models(root)
    print(f"{len(models)} models in {root}, {sum(m.disk_bytes for m in models) / 2**20:.1f} MiB")
    for m in models:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.last_used))
        print(
            f"{m.model_id}  {m.disk_bytes / 2**20:9.1f} MiB  {m.spans:5d} spans  used {used}  "
            + ", ".join(m.files)
        )
    return 0


def weights_dir(settings: object) -> Path:
    """Where a peer keeps the weights it fetched: in ``--models-dir``, else its
    state dir."""
    from dnet.config import PeerSettings

    assert isinstance(settings, PeerSettings)
    if settings.models_dir is not None:
        return settings.models_dir / "dnet-store"
    return settings.state_dir / "weights"


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


async def _run_peer(settings: object, identity: object, key: bytes) -> None:
    import signal

    import trio

    from dnet.config import PeerSettings
    from dnet.identity import Identity
    from dnet.peer.daemon import PeerDaemon
    from dnet.protocol import WS_PATH
    from dnet.runtime.compute import open_compute_thread

    assert isinstance(settings, PeerSettings) and isinstance(identity, Identity)
    # Catch the signals before announcing the address: whoever reads that line may
    # signal at once.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_compute_thread() as compute, trio.open_nursery() as nursery:
            daemon = PeerDaemon(
                identity,
                key,
                compute,
                name=settings.name,
                request_idle_timeout_s=settings.request_idle_timeout_s,
                state_dir=settings.state_dir,
                max_memory=settings.max_memory,
                weights_dir=weights_dir(settings),
                local_dirs=[settings.models_dir] if settings.models_dir else [],
                hf_cache=hf_cache_dir(),
                max_disk=settings.max_disk,
            )
            port = await nursery.start(daemon.run, settings.host, settings.port)
            host = f"[{settings.host}]" if ":" in settings.host else settings.host
            budget = f" max-memory={settings.max_memory}" if settings.max_memory else ""
            print(
                f"dnet-peer listening ws://{host}:{port}{WS_PATH} peer-id={identity.peer_id} "
                f"name={settings.name}{budget}",
                flush=True,
            )
            if settings.mdns:
                nursery.start_soon(_advertise, settings, identity.peer_id, port)
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


async def _advertise(settings: object, peer_id: str, port: int) -> None:
    import ipaddress

    import psutil
    import trio

    from dnet.config import PeerSettings
    from dnet.discovery.mdns import SERVICE, open_advertiser

    assert isinstance(settings, PeerSettings)
    if settings.host in ("0.0.0.0", ""):
        interfaces = sorted(
            a.address
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family.name == "AF_INET" and not ipaddress.ip_address(a.address).is_loopback
        )
    else:
        interfaces = [] if ipaddress.ip_address(settings.host).is_loopback else [settings.host]
    if not interfaces:
        log.info("listening on loopback only: not advertising over mDNS")
        return
    async with open_advertiser(interfaces, port, peer_id, settings.name):
        print(
            f"dnet-peer advertising {SERVICE} name={settings.name} on {', '.join(interfaces)}",
            file=sys.stderr,
            flush=True,
        )
        await trio.sleep_forever()
