"""Entry points: argv → settings → the job. The only place that wires things."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time

from dnet.config import GenerateSettings, default_cache_dir
from dnet.errors import DnetError

log = logging.getLogger(__name__)


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dnet-generate",
        description="Generate text by running a model as several layer slices in one process "
        "(activations cross every slice boundary as bytes, as they will between peers).",
    )
    p.add_argument(
        "--model",
        help="model directory, .gguf file, cached HF repo id, or smollm2-135m (the default)",
    )
    p.add_argument("--slices", type=int, help="how many slices to cut the model into (default 2)")
    p.add_argument("--prompt", help="the user message")
    p.add_argument("--max-tokens", type=int, help="new tokens to generate (default 48)")
    p.add_argument("--temperature", type=float, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--prefill-chunk", type=int, help="prompt tokens per prefill step (default 2048)"
    )
    p.add_argument("--no-openblas", action="store_true", help="keep MLX's bundled BLAS")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default)")
    return p


def generate_main(argv: list[str] | None = None) -> int:
    settings = GenerateSettings.from_args(_generate_parser().parse_args(argv))
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    if settings.use_openblas:
        from dnet.runtime.blas import preload_openblas

        preload_openblas(cache_dir=settings.cache_dir / "native")
    try:
        return _generate(settings)
    except DnetError as exc:
        print(f"dnet-generate: {exc.message}", file=sys.stderr)
        return 2


def _generate(settings: GenerateSettings) -> int:
    from dnet.demo import demo_model
    from dnet.runtime.blas import loaded_blas
    from dnet.runtime.local import even_cuts, generate, load_chain
    from dnet.runtime.model_dir import open_model_dir
    from dnet.runtime.tokenizer import chat_prompt, load_tokenizer
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
    prompt = chat_prompt(tokenizer, [{"role": "user", "content": settings.prompt}])
    print(f"> {settings.prompt}", file=sys.stderr)
    detok = tokenizer.detokenizer
    detok.reset()
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
        detok.add_token(token.token_id)
        print(detok.last_segment, end="", flush=True)
    detok.finalize()
    print(detok.last_segment, flush=True)
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


def _peer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dnet-peer",
        description="Run a dnet peer: hold a slice of a model's layers and serve it over an "
        "authenticated WebSocket.",
    )
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 0: any free port)")
    p.add_argument("--name", help="a human name for this peer (default: the host name)")
    p.add_argument(
        "--state-dir", help="where the identity and cluster keys live (default ~/.local/state/dnet)"
    )
    p.add_argument(
        "--cluster-key-file", help="file holding the cluster key (hex); DNET_CLUSTER_KEY also works"
    )
    p.add_argument("--no-mdns", action="store_true", help="do not advertise over mDNS")
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        type=_size_arg,
        help="memory this peer offers for a model's weights and KV cache, e.g. 512MiB or "
        "2GiB (DNET_MAX_MEMORY; default: what the machine has free)",
    )
    p.add_argument("--no-openblas", action="store_true", help="keep MLX's bundled BLAS")
    p.add_argument("--log-level", help="DEBUG, INFO (default), WARNING")
    return p


def _size_arg(text: str) -> str:
    from dnet.config import parse_size

    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def peer_main(argv: list[str] | None = None) -> int:
    from dnet.config import PeerSettings

    try:
        settings = PeerSettings.from_args(_peer_parser().parse_args(argv))
    except ValueError as exc:  # DNET_MAX_MEMORY that is not a size
        print(f"dnet-peer: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.use_openblas:
        from dnet.runtime.blas import preload_openblas

        preload_openblas(
            settings.openblas_thread_timeout, cache_dir=default_cache_dir(os.environ) / "native"
        )
    from dnet.runtime.device_profile import return_large_frees

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
