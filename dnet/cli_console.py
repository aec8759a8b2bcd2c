"""``dnet-console``: the head (discovery, placement, loading, requests) and its HTTP
API; ``--headless`` runs it without the dashboard."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from functools import partial

from dnet.config import ConsoleSettings
from dnet.errors import DnetError

log = logging.getLogger("dnet.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dnet-console",
        description="Run the dnet head: find peers, place and load a model across them, "
        "and serve the OpenAI API.",
    )
    p.add_argument("--headless", action="store_true", help="no dashboard: just the head and API")
    p.add_argument("--connect", metavar="URL", help="attach the dashboard to a running head")
    p.add_argument("--http-host", help="API address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="API port (default 8080; 0 = any free port)")
    p.add_argument(
        "--peer", action="append", metavar="HOST:PORT", help="a peer to use (repeatable)"
    )
    p.add_argument("--peers-file", help="a file of peer addresses, one per line")
    p.add_argument("--no-mdns", action="store_true", help="do not look for peers over mDNS")
    p.add_argument(
        "--interface",
        action="append",
        metavar="IPV4",
        help="browse mDNS on this address (repeatable; default: every non-loopback IPv4)",
    )
    p.add_argument("--model", help="prepare and load this model (directory or HF repo id) at start")
    p.add_argument(
        "--state-dir", help="where the head's identity lives (default ~/.local/state/dnet)"
    )
    p.add_argument(
        "--cluster-key-file", help="file holding the cluster key (hex); DNET_CLUSTER_KEY also works"
    )
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (DNET_API_KEY)")
    p.add_argument(
        "--max-concurrent", type=int, help="requests served at once; more get 429 (default 64)"
    )
    p.add_argument("--context", type=int, help="context length to place for (default 4096)")
    p.add_argument("--log-level", help="DEBUG, INFO (default), WARNING")
    return p


def console_main(argv: list[str] | None = None) -> int:
    settings = ConsoleSettings.from_args(_parser().parse_args(argv))
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not settings.headless:
        print(
            "dnet-console: the dashboard is not built yet; run with --headless",
            file=sys.stderr,
        )
        return 2
    import trio

    from dnet.identity import load_cluster_key, load_identity

    try:
        peers = list(settings.peers)
        if settings.peers_file is not None:
            from dnet.discovery.static import read_peers_file

            peers += read_peers_file(settings.peers_file)
        # The head's own identity, apart from a peer's that may share the state dir.
        identity = load_identity(settings.state_dir / "head")
        key, key_path, generated = load_cluster_key(
            settings.state_dir, settings.cluster_key_file, settings.cluster_key
        )
    except DnetError as exc:
        print(f"dnet-console: {exc.message}", file=sys.stderr)
        return 2
    if generated:
        print(
            f"dnet-console: generated a new cluster key in {key_path}; peers need the same key "
            "(--cluster-key-file or DNET_CLUSTER_KEY)",
            file=sys.stderr,
        )
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_run_head, settings, identity, key, peers)
    return 0


def _mdns_interfaces(settings: ConsoleSettings) -> list[str]:
    import ipaddress

    import psutil

    if not settings.mdns:
        return []
    if settings.interfaces:
        return list(settings.interfaces)
    return sorted(
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family.name == "AF_INET" and not ipaddress.ip_address(a.address).is_loopback
    )


async def _run_head(settings: ConsoleSettings, identity: object, key: bytes, peers: list) -> None:
    import signal

    import trio

    from dnet.api.app import create_app
    from dnet.api.logs import LogBuffer
    from dnet.api.server import GRACEFUL_TIMEOUT_S, serve_api
    from dnet.head.coordinator import open_coordinator
    from dnet.identity import Identity

    assert isinstance(identity, Identity)
    interfaces = _mdns_interfaces(settings)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            open_coordinator(
                identity,
                key,
                static_peers=peers,
                mdns_interfaces=interfaces,
                max_concurrent=settings.max_concurrent,
                context=settings.context,
            ) as coordinator,
            trio.open_nursery() as nursery,
        ):
            logs = LogBuffer()
            logging.getLogger().addHandler(logs)
            app = create_app(coordinator, api_key=settings.api_key, logs=logs)
            stop, served = trio.Event(), trio.Event()

            async def serve(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
                try:
                    await serve_api(
                        app,
                        settings.http_host,
                        settings.http_port,
                        shutdown_trigger=stop.wait,
                        task_status=task_status,
                    )
                finally:
                    served.set()

            url = await nursery.start(serve)
            print(
                f"dnet-console listening {url} peer-id={identity.peer_id} "
                f"mdns={','.join(interfaces) or 'off'}",
                flush=True,
            )
            if settings.model:
                nursery.start_soon(partial(_load_at_start, coordinator, settings, len(peers)))
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                break
            stop.set()
            with trio.move_on_after(GRACEFUL_TIMEOUT_S + 2):
                await served.wait()
            nursery.cancel_scope.cancel()


async def _load_at_start(coordinator: object, settings: ConsoleSettings, static: int) -> None:
    import trio

    from dnet.head.coordinator import Coordinator, wait_for_peers

    assert isinstance(coordinator, Coordinator) and settings.model is not None
    found = await wait_for_peers(coordinator, max(static, 1), settings.wait_peers_s)
    if not static:
        await trio.sleep(2.0)  # let the rest of an mDNS neighbourhood answer
    log.info("loading %s across %d peers", settings.model, found)
    try:
        await coordinator.load(model=settings.model)
    except DnetError as exc:
        log.error("could not load %s: %s", settings.model, exc.message)


if __name__ == "__main__":
    raise SystemExit(console_main())
