"""Peers named by the user: ``--peer HOST:PORT`` (repeatable) and ``--peers-file``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import trio

from dnet.discovery import PeerFound, PeerLost
from dnet.errors import DnetError
from dnet.protocol import WS_PATH


class BadPeerAddress(DnetError):
    code = "bad_peer_address"


def parse_peer_address(text: str) -> str:
    """``HOST:PORT``, ``[IPv6]:PORT`` or a full ``ws://`` URL → a ``ws://`` URL.

    Raises:
        BadPeerAddress
    """
    text = text.strip()
    url = text if "://" in text else f"ws://{text}"
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "ws" or not parts.hostname or port is None:
        raise BadPeerAddress(f"{text!r} is not HOST:PORT (or ws://HOST:PORT{WS_PATH})")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"ws://{host}:{port}{parts.path or WS_PATH}"


def read_peers_file(path: Path) -> list[str]:
    """One address per line; blank lines and ``#`` comments ignored.

    Raises:
        BadPeerAddress: an unreadable file or a bad line (named with its number).
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BadPeerAddress(f"cannot read the peers file {path}: {exc}") from exc
    out = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                out.append(parse_peer_address(line))
            except BadPeerAddress as exc:
                raise BadPeerAddress(f"{path}:{number}: {exc.message}") from None
    return out


async def announce_static(
    addresses: Sequence[str], send: trio.MemorySendChannel[PeerFound | PeerLost]
) -> None:
    """Feed static addresses into the same stream mDNS feeds."""
    for address in addresses:
        await send.send(PeerFound(parse_peer_address(address), None, "", "static"))


async def redial_static(
    addresses: Sequence[str],
    send: trio.MemorySendChannel[PeerFound | PeerLost],
    interval_s: float = 10.0,
) -> None:
    """Announce the static addresses again every ``interval_s``, so that a peer
    that was down (or restarted) is joined when it comes back; whoever follows the
    events skips those already connected."""
    while True:
        await trio.sleep(interval_s)
        await announce_static(addresses, send)
