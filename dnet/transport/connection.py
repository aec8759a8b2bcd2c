"""Authenticated connections: a link, a finished handshake, then framed messages.

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
from trio_websocket import (
    HandshakeError,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

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
from dnet.transport.links import (
    MAX_MESSAGE_BYTES,
    RECEIVE_BUFFER_BYTES,
    Link,
    LinkClosed,
    WebSocketLink,
)

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0


class Connection:
    """Framed messages over an authenticated link. Sends are serialised, so many
    tasks may share one connection."""

    def __init__(
        self, link: Link, remote_peer_id: str, remote_name: str, address: str = ""
    ) -> None:
        self.link = link
        self.remote_peer_id = remote_peer_id
        self.remote_name = remote_name
        self.address = address
        self._send_lock = trio.Lock()
        self.closed = False

    def __repr__(self) -> str:
        return f"<Connection {self.remote_name or '?'} {self.remote_peer_id[:12]} {self.address}>"

    async def send(self, message: Message, payload: bytes = b"") -> None:
        """Raises:
        LinkClosed
        """
        frame = encode(message, payload)
        async with self._send_lock:
            await self.link.send(frame)

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
        identity, cluster_key, verify, expected_peer_id=expected_peer_id, name=name
    )
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            await link.send(hs.hello())
            await link.send(hs.receive(await link.receive()))
    except HandshakeFailed as exc:
        await Connection(link, "", "").fail(exc)
        raise
    except trio.TooSlowError:
        await link.aclose()
        raise HandshakeFailed(f"handshake with {address or 'peer'} timed out") from None
    assert hs.remote_peer_id is not None
    return Connection(link, hs.remote_peer_id, hs.remote_name, address)


async def server_handshake(
    link: Link, identity: Signer, cluster_key: bytes, verify: Verify, *, name: str = ""
) -> Connection:
    """Raises:
    HandshakeFailed (the link is closed), LinkClosed
    """
    hs = ServerHandshake(identity, cluster_key, verify, name=name)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT_S):
            reply = hs.receive(await link.receive())
            assert reply is not None
            await link.send(reply)
            hs.receive(await link.receive())
    except HandshakeFailed as exc:
        await Connection(link, "", "").fail(exc)
        raise
    except trio.TooSlowError:
        await link.aclose()
        raise HandshakeFailed("handshake timed out") from None
    assert hs.remote_peer_id is not None
    return Connection(link, hs.remote_peer_id, hs.remote_name)


def check_address(address: str) -> str:
    """Raises:
    PeerUnavailable: not a ``ws://host:port/dnet/1`` URL.
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
    check_address(address)
    connected = False
    try:
        async with open_websocket_url(
            address,
            max_message_size=MAX_MESSAGE_BYTES,
            receive_buffer_size=RECEIVE_BUFFER_BYTES,
            connect_timeout=CONNECT_TIMEOUT_S,
            disconnect_timeout=2,
        ) as ws:
            link = WebSocketLink(ws, address)
            conn = await client_handshake(
                link,
                identity,
                cluster_key,
                verify,
                expected_peer_id=expected_peer_id,
                name=name,
                address=address,
            )
            connected = True
            try:
                yield conn
            finally:
                await conn.aclose()
    except (OSError, HandshakeError, trio.TooSlowError) as exc:
        if connected:
            raise
        raise PeerUnavailable(f"cannot connect to {address}: {exc}") from exc


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

    async def accept(request: WebSocketRequest) -> None:
        if request.path != WS_PATH:
            await request.reject(404, body=f"dnet speaks on {WS_PATH}\n".encode())
            return
        ws = await request.accept()
        remote = ws.remote
        link = WebSocketLink(
            ws, f"{getattr(remote, 'address', '?')}:{getattr(remote, 'port', '?')}"
        )
        try:
            conn = await server_handshake(link, identity, cluster_key, verify, name=name)
        except (HandshakeFailed, LinkClosed) as exc:
            log.warning("refused a connection from %s: %s", link.description, exc)
            await link.aclose()
            return
        conn.address = link.description
        try:
            await handler(conn)
        finally:
            await conn.aclose()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(
                accept,
                host,
                port,
                None,
                handler_nursery=nursery,
                max_message_size=MAX_MESSAGE_BYTES,
                receive_buffer_size=RECEIVE_BUFFER_BYTES,
                disconnect_timeout=2,
                task_status=task_status,
            )
        )
        task_status.started(server.port)
