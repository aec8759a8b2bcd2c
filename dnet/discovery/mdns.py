"""mDNS with python-zeroconf: advertise a peer, browse for peers.

zeroconf runs its own thread (``use_asyncio=False``, so it never attaches to an
asyncio loop that happens to run, as in the console); its blocking calls go through
``trio.to_thread`` and its callbacks come back through the Trio token. It binds only
to the interfaces it is given.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress

import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from dnet.discovery import PeerFound, PeerLost
from dnet.protocol import PROTOCOL_ID, WS_PATH

log = logging.getLogger(__name__)

SERVICE = "_dnet._tcp.local."


def _zeroconf(interfaces: Sequence[str]) -> Zeroconf:
    return Zeroconf(interfaces=list(interfaces), ip_version=IPVersion.V4Only, use_asyncio=False)


@asynccontextmanager
async def open_advertiser(
    interfaces: Sequence[str], port: int, peer_id: str, name: str
) -> AsyncIterator[ServiceInfo]:
    """Advertise ``_dnet._tcp.local.`` on ``interfaces`` (IPv4 addresses) until exit;
    leaving sends a goodbye."""
    info = ServiceInfo(
        SERVICE,
        f"{name}-{peer_id[2:10]}.{SERVICE}",
        port=port,
        properties={"peer_id": peer_id, "name": name, "proto": PROTOCOL_ID, "path": WS_PATH},
        addresses=[socket.inet_aton(a) for a in interfaces],
    )
    zc = await trio.to_thread.run_sync(_zeroconf, interfaces)
    try:
        await trio.to_thread.run_sync(zc.register_service, info)
        log.info("advertising %s on %s port %d", info.name, ", ".join(interfaces), port)
        yield info
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(zc.unregister_service, info)
            await trio.to_thread.run_sync(zc.close)


async def browse(
    interfaces: Sequence[str],
    send: trio.MemorySendChannel[PeerFound | PeerLost],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Report dnet peers appearing and leaving on ``interfaces`` until cancelled."""
    token = trio.lowlevel.current_trio_token()
    changes_send, changes_receive = trio.open_memory_channel[tuple[str, ServiceStateChange]](1000)

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # zeroconf's thread: hand over to Trio, never block here.
        with suppress(trio.RunFinishedError):
            token.run_sync_soon(changes_send.send_nowait, (name, state_change))

    zc = await trio.to_thread.run_sync(_zeroconf, interfaces)
    names: dict[str, str] = {}
    browser: ServiceBrowser | None = None
    try:
        browser = await trio.to_thread.run_sync(
            lambda: ServiceBrowser(zc, SERVICE, handlers=[on_change])
        )
        task_status.started()
        async for name, change in changes_receive:
            if change is ServiceStateChange.Removed:
                if name in names:
                    await send.send(PeerLost(names.pop(name)))
                continue
            info = await trio.to_thread.run_sync(zc.get_service_info, SERVICE, name, 2000)
            found = _peer(info)
            if found is None:
                log.debug("ignoring %s: not a dnet peer record", name)
                continue
            if names.get(name) != found.peer_id:
                names[name] = found.peer_id or ""
                await send.send(found)
    finally:
        with trio.CancelScope(shield=True):
            if browser is not None:
                await trio.to_thread.run_sync(browser.cancel)
            await trio.to_thread.run_sync(zc.close)


def _peer(info: ServiceInfo | None) -> PeerFound | None:
    if info is None or not info.port:
        return None
    props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if props.get("proto") != PROTOCOL_ID or not props.get("peer_id") or not addresses:
        return None
    path = props.get("path") or WS_PATH
    return PeerFound(
        f"ws://{addresses[0]}:{info.port}{path}", props["peer_id"], props.get("name", ""), "mdns"
    )
