"""``dnet-console``: the head (discovery, placement, loading, requests) and its HTTP
API; ``--headless`` runs it without the dashboard."""

from __future__ import annotations

import contextlib
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

import attrs

from dnet.config import CONSOLE, ConsoleSettings, SettingsError, build_parser
from dnet.errors import DnetError

log = logging.getLogger("dnet.cli")


CONSOLE_HELP = (
    "Run the dnet head: find peers, place and load a model across them, and serve the OpenAI API."
)


def console_main(argv: list[str] | None = None) -> int:
    args = build_parser(CONSOLE, CONSOLE_HELP).parse_args(argv)
    try:
        settings = _with_api_key(ConsoleSettings.from_args(args))
    except (SettingsError, DnetError) as exc:
        print(f"dnet-console: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    if settings.api_key is None and not settings.connect and not _is_loopback(settings.http_host):
        print(
            f"dnet-console: WARNING: serving {settings.http_host} without an API key: anyone "
            "who can reach it can use and control this head (--api-key-file FILE)",
            file=sys.stderr,
        )
    if settings.connect:
        return _dashboard(settings, None)
    if settings.demo:
        return _demo(settings)
    try:
        peers = list(settings.peers)
        if settings.peers_file is not None:
            from dnet.discovery.static import read_peers_file

            peers += read_peers_file(settings.peers_file)
    except DnetError as exc:
        print(f"dnet-console: {exc.message}", file=sys.stderr)
        return 2
    return _local_head(settings, peers)


def _with_api_key(settings: ConsoleSettings) -> ConsoleSettings:
    """Settings with the key of ``--api-key-file`` read in (``--api-key`` wins).

    Raises:
        KeyFileError
    """
    if settings.api_key is not None or settings.api_key_file is None:
        return settings
    from dnet.identity import read_secret_file

    key = read_secret_file(settings.api_key_file, "the API key file").strip()
    return attrs.evolve(settings, api_key=key or None)


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _local_head(settings: ConsoleSettings, peers: list[str], key: bytes | None = None) -> int:
    """Run the head here: headless under ``trio.run``, else inside the dashboard."""
    from dnet.limits import raise_file_limit

    raise_file_limit()
    from dnet.identity import load_cluster_key, load_identity

    _configure_logging(settings)
    try:
        # The head's own identity, apart from a peer's that may share the state dir.
        identity = load_identity(settings.state_dir / "head")
        if key is None:
            key, key_path, generated = load_cluster_key(
                settings.state_dir, settings.cluster_key_file, settings.cluster_key
            )
            if generated:
                print(
                    f"dnet-console: generated a new cluster key in {key_path}; peers need the "
                    "same key (--cluster-key-file or DNET_CLUSTER_KEY)",
                    file=sys.stderr,
                )
    except DnetError as exc:
        print(f"dnet-console: {exc.message}", file=sys.stderr)
        return 2
    if not settings.headless:
        return _dashboard(settings, partial(serve_head, settings, identity, key, peers))
    import trio

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_run_head, settings, identity, key, peers)
    return 0


def _configure_logging(settings: ConsoleSettings) -> None:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if settings.headless:
        logging.basicConfig(level=settings.log_level, format=fmt)
        return
    # Under the dashboard stderr would scribble over the screen: log to a file (and
    # to the head's log buffer, which the Logs tab shows).
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=settings.log_level, format=fmt, filename=settings.state_dir / "console.log"
    )
    for chatty in ("httpx", "httpcore"):  # the dashboard's own polls: one line each
        logging.getLogger(chatty).setLevel(logging.WARNING)


def _dashboard(settings: ConsoleSettings, head: Any) -> int:
    from tui.app import DnetConsole

    if head is None:
        from tui.client import HeadClient
        from tui.source import HttpStatusSource

        assert settings.connect is not None
        app = DnetConsole(HttpStatusSource(HeadClient(settings.connect, settings.api_key)))
    else:
        app = DnetConsole(head=head, api_key=settings.api_key, model=settings.model or "")
    app.run()
    if app.return_code:
        return app.return_code
    return 0


def _demo(settings: ConsoleSettings) -> int:
    """Two local peers, the tiny demo model loaded across them, and the console."""
    import tempfile

    from dnet.demo import open_demo, port_is_free

    root = Path(tempfile.mkdtemp(prefix="dnet-demo-"))
    if settings.http_port == 8080 and not port_is_free(settings.http_host, 8080):
        settings = attrs.evolve(settings, http_port=0)
    try:
        with open_demo(
            root, settings.cache_dir, model=settings.model, context=settings.context
        ) as demo:
            demo_settings = attrs.evolve(
                settings,
                model=demo.model,
                mdns=False,
                state_dir=root,
            )
            if settings.headless:
                print(
                    f"dnet-console demo: peers {' '.join(demo.peers)}; files in {root}", flush=True
                )
            return _local_head(demo_settings, list(demo.peers), demo.cluster_key)
    except DnetError as exc:
        print(f"dnet-console: {exc.message}", file=sys.stderr)
        return 2


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


APP_OPTIONS = ("api_key", "cors_origin", "allowed_hosts", "max_body")
HEAD_OPTIONS = ("max_concurrent", "context", "compute_dtype", "decode_lanes", "cache_dir")


def _options(settings: ConsoleSettings, names: tuple[str, ...]) -> dict[str, Any]:
    """The settings ``names`` as keyword arguments of the same names."""
    return {name: getattr(settings, name) for name in names}


async def _serve_until(
    app: Any, settings: ConsoleSettings, stop: Any, served: Any, task_status: Any
) -> None:
    """Serve the API until ``stop`` is set; ``served`` once it has finished."""
    from dnet.api.server import serve_api

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


async def serve_head(
    settings: ConsoleSettings,
    identity: object,
    key: bytes,
    peers: list[str],
    stop: object,
    *,
    task_status: Any = None,
) -> None:
    """The head: discovery, coordinator and API, until ``stop`` (a ``trio.Event``)
    is set; then in-flight requests get ``GRACEFUL_TIMEOUT_S`` to finish. Reports
    the API's URL through ``task_status``. Used headless and inside the console."""
    import trio

    from dnet.api.app import create_app
    from dnet.api.logs import LogBuffer
    from dnet.api.server import GRACEFUL_TIMEOUT_S
    from dnet.head.service import open_coordinator
    from dnet.identity import Identity

    assert isinstance(identity, Identity) and isinstance(stop, trio.Event)
    interfaces = _mdns_interfaces(settings)
    logs = LogBuffer()
    logging.getLogger().addHandler(logs)
    try:
        async with (
            open_coordinator(
                identity,
                key,
                static_peers=peers,
                mdns_interfaces=interfaces,
                **_options(settings, HEAD_OPTIONS),
            ) as coordinator,
            trio.open_nursery() as nursery,
        ):
            app = create_app(coordinator, logs=logs, **_options(settings, APP_OPTIONS))
            served = trio.Event()
            url = await nursery.start(_serve_until, app, settings, stop, served)
            log.info(
                "head %s serving %s; mDNS on %s",
                identity.peer_id[:12],
                url,
                ", ".join(interfaces) or "no interface",
            )
            if task_status is not None:
                task_status.started(url)
            if settings.model:
                nursery.start_soon(partial(_load_at_start, coordinator, settings, len(peers)))
            await stop.wait()
            with trio.move_on_after(GRACEFUL_TIMEOUT_S + 2):
                await served.wait()
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger().removeHandler(logs)


async def _run_head(settings: ConsoleSettings, identity: object, key: bytes, peers: list) -> None:
    import signal

    import trio

    from dnet.identity import Identity

    assert isinstance(identity, Identity)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            url = await nursery.start(partial(serve_head, settings, identity, key, peers, stop))
            print(
                f"dnet-console listening {url} peer-id={identity.peer_id} "
                f"mdns={','.join(_mdns_interfaces(settings)) or 'off'}",
                flush=True,
            )
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                break
            stop.set()


async def _load_at_start(coordinator: object, settings: ConsoleSettings, static: int) -> None:
    import trio

    from dnet.head.coordinator import Coordinator
    from dnet.head.service import wait_for_peers

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
