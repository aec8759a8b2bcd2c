"""Authenticated connections: a link, a finished handshake, then framed messages,
each sealed (``dnet.transport.sealed``).

``open_connection`` dials a ``ws://`` address; ``serve_connections`` accepts them.
Either way the handshake completes before any other message is read, and a failed
handshake closes the link.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from urllib.parse import urlsplit

import trio

from dnet.errors import PeerUnavailable
from dnet.protocol import WS_PATH
from dnet.protocol.codec import ProtocolError, decode, encode
from dnet.protocol.handshake import (
    ClientHandshake,
    HandshakeFailed,
    ServerHandshake,
    Signer,
    Verify,
)
from dnet.protocol.messages import Error, Message
from dnet.transport.links import HANDSHAKE_MAX_BYTES, MAX_MESSAGE_BYTES, Link, LinkClosed
from dnet.transport.refusals import RateLimitedLog
from dnet.transport.sealed import SealedLink, X25519Exchange
from dnet.transport.websocket import WsLink, connect_websocket, serve_websocket

log = logging.getLogger(__name__)

_refused = RateLimitedLog(log)  # strangers may knock thousands of times

HANDSHAKE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0


class Connection:
    """Framed messages over an authenticated link. Links serialise sends, so many
    tasks may share one connection; one task reads it."""

    def __init__(
        self, link: Link, remote_peer_id: str, remote_name: str, address: str = ""
    ) -> None:
        self.link = link
        self.remote_peer_id = remote_peer_id
        self.remote_name = remote_name
        self.address = address
        self.closed = False

    def __repr__(self) -> str:
        return f"<Connection {self.remote_name or '?'} {self.remote_peer_id[:12]} {self.address}>"

    async def send(self, message: Message, payload: bytes = b"") -> None:
        """Raises:
        LinkClosed
        """
        await self.link.send(encode(message, payload))

    async def receive(self) -> tuple[Message, bytes]:
        """Raises:
        LinkClosed, ProtocolError
        """
        return decode(await self.link.receive())

    async def fail(self, error: ProtocolError | HandshakeFailed) -> None:
        """Tell the other side why, then close: what a broken frame earns."""
        with trio.move_on_after(1), trio.CancelScope(shield=True), suppress(LinkClosed):
            await self.send(Error(error.code, error.message))
        await self.aclose()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self.link.aclose()


@asynccontextmanager
async def _handshaking(link: Link, who: str) -> AsyncIterator[None]:
    """The handshake's time and size limits, and its failures: tell the other
    side, close. Only once it succeeds may big messages come."""
    link.limit(HANDSHAKE_MAX_BYTES)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            yield
        link.limit(MAX_MESSAGE_BYTES)
    except HandshakeFailed as exc:
        await Connection(link, "", "").fail(exc)
        raise
    except trio.TooSlowError:
        await link.aclose()
        raise HandshakeFailed(f"handshake with {who} timed out") from None


async def client_handshake(
    link: Link,
    identity: Signer,
    cluster_key: bytes,
    verify: Verify,
    *,
    expected_peer_id: str | None = None,
    name: str = "",
    address: str = "",
) -> Connection:
    """Raises:
    HandshakeFailed (the link is closed), LinkClosed
    """
    hs = ClientHandshake(
        identity,
        cluster_key,
        verify,
        expected_peer_id=expected_peer_id,
        name=name,
        new_kex=X25519Exchange,
    )
    async with _handshaking(link, address or "peer"):
        await link.send(hs.hello())
        await link.send(hs.receive(await link.receive()))
    assert hs.remote_peer_id is not None
    return Connection(
        SealedLink(link, *hs.frame_keys()), hs.remote_peer_id, hs.remote_name, address
    )


async def server_handshake(
    link: Link, identity: Signer, cluster_key: bytes, verify: Verify, *, name: str = ""
) -> Connection:
    """Raises:
    HandshakeFailed (the link is closed), LinkClosed
    """
    hs = ServerHandshake(identity, cluster_key, verify, name=name, new_kex=X25519Exchange)
    async with _handshaking(link, "peer"):
        reply = hs.receive(await link.receive())
        assert reply is not None
        await link.send(reply)
        hs.receive(await link.receive())
    assert hs.remote_peer_id is not None
    return Connection(SealedLink(link, *hs.frame_keys()), hs.remote_peer_id, hs.remote_name)


def check_address(address: str) -> str:
    """Raises:
    PeerUnavailable: not a ``ws://host:port/dnet/2`` URL.
    """
    parts = urlsplit(address)
    if parts.scheme != "ws" or not parts.hostname or parts.port is None:
        raise PeerUnavailable(f"{address!r} is not a ws://HOST:PORT{WS_PATH} address")
    return address


@asynccontextmanager
async def open_connection(
    address: str,
    identity: Signer,
    cluster_key: bytes,
    verify: Verify,
    *,
    expected_peer_id: str | None = None,
    name: str = "",
) -> AsyncIterator[Connection]:
    """Dial ``address`` and authenticate.

    Raises:
        PeerUnavailable: cannot connect; HandshakeFailed: the peer is not who we
        expect or not in our cluster.
    """
    parts = urlsplit(check_address(address))
    assert parts.hostname is not None and parts.port is not None
    link = await connect_websocket(
        parts.hostname, parts.port, parts.path or WS_PATH, CONNECT_TIMEOUT_S
    )
    try:
        conn = await client_handshake(
            link,
            identity,
            cluster_key,
            verify,
            expected_peer_id=expected_peer_id,
            name=name,
            address=address,
        )
        yield conn
    finally:
        await link.aclose()


async def serve_connections(
    handler: Callable[[Connection], Awaitable[None]],
    host: str,
    port: int,
    identity: Signer,
    cluster_key: bytes,
    verify: Verify,
    *,
    name: str = "",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept WebSocket connections on ``WS_PATH``, authenticate each, and run
    ``handler(connection)``; reports the bound port through ``task_status``."""

    async def accept(link: WsLink) -> None:
        try:
            conn = await server_handshake(link, identity, cluster_key, verify, name=name)
        except (HandshakeFailed, LinkClosed) as exc:
            _refused(logging.WARNING, "refused a connection from %s: %s", link.description, exc)
            return
        conn.address = link.description
        await handler(conn)

    await serve_websocket(accept, host, port, WS_PATH, task_status=task_status)
