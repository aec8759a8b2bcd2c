"""A lean WebSocket link: wsproto's upgrade handshake, then RFC 6455 frames read and
written by ``frames.py`` straight off a Trio stream.

trio-websocket runs a reader task and a message queue per connection; on this
project's 2-core machines that cost ~300 µs per 4 KiB message one way against
~60 µs for the bare TCP stream. Here the reading task itself parses frames, so a
message costs one ``receive_some``, one ``send_all`` and a few µs of framing.
Still RFC 6455 on the wire (tests talk to it with trio-websocket as an
independent client and server).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    Event,
    RejectConnection,
    RejectData,
    Request,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from dnet.errors import PeerUnavailable
from dnet.transport.frames import (
    CLOSE_NORMAL,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameReader,
    close_payload,
    frame_parts,
    parse_close,
)
from dnet.transport.links import MAX_MESSAGE_BYTES, RECEIVE_BUFFER_BYTES, LinkClosed
from dnet.transport.refusals import RateLimitedLog, SourceCaps, TooManyConnections

log = logging.getLogger(__name__)

MAX_HTTP_HEAD_BYTES = 64 * 1024
SPLIT_WRITE_BYTES = 1 << 16  # a bigger frame body is written after its header


class WebSocketError(PeerUnavailable):
    """The other side does not speak WebSocket, or refused the upgrade."""

    code = "websocket_error"


class WsLink:
    """A ``Link`` over one upgraded connection; ``client`` is the side that dialled
    (it masks what it sends), ``leftover`` the bytes read past the upgrade."""

    def __init__(
        self, stream: trio.abc.Stream, *, client: bool, description: str, leftover: bytes = b""
    ) -> None:
        self._stream = stream
        self._client = client
        self._reader = FrameReader(masked=not client, max_message=MAX_MESSAGE_BYTES)
        self._reader.receive_data(leftover)
        self._send_lock = trio.Lock()
        self._closed = False
        self._close_sent = False
        self.description = description

    async def _write(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._closed = True
            raise LinkClosed(f"connection to {self.description} closed") from exc

    async def _send_frame(self, opcode: int, payload: bytes) -> None:
        # Take the lock without a trip around the scheduler when it is free (the
        # common case); send_all checkpoints anyway.
        try:
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            if self._closed or self._close_sent:
                raise LinkClosed(f"connection to {self.description} closed")
            if opcode == OP_CLOSE:
                self._close_sent = True
            header, body = frame_parts(opcode, payload, mask=self._client)
            if len(body) < SPLIT_WRITE_BYTES:
                await self._write(header + body)  # one write: small frames are latency
            else:
                await self._write(header)
                await self._write(body)
        finally:
            self._send_lock.release()

    def limit(self, max_message: int) -> None:
        self._reader.limit(max_message)

    async def send(self, data: bytes) -> None:
        await self._send_frame(OP_BINARY, data)

    async def receive(self) -> bytes:
        # One reader per link by design (Trio's stream raises if that is broken);
        # no lock, so no extra trip around the scheduler per message.
        while True:
            try:
                message = self._reader.next_message()
            except FrameError as exc:
                await self._close(exc.close_code, exc.message)
                raise LinkClosed(
                    f"{self.description} broke the WebSocket protocol: {exc.message}"
                ) from None
            if message is not None:
                opcode, data = message
                if opcode in (OP_BINARY, OP_TEXT):
                    return data
                await self._control(opcode, data)
                continue
            if self._closed:
                raise LinkClosed(f"connection to {self.description} closed")
            try:
                data = await self._stream.receive_some(RECEIVE_BUFFER_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._closed = True
                raise LinkClosed(f"connection to {self.description} closed") from exc
            if not data:
                self._closed = True
                raise LinkClosed(f"{self.description} hung up")
            self._reader.receive_data(data)

    async def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            with contextlib.suppress(LinkClosed):
                await self._send_frame(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            try:
                code, _ = parse_close(payload)
            except FrameError as exc:
                await self._close(exc.close_code, exc.message)
            else:
                # Echo the code back, as RFC 6455 asks (1005 means "none given").
                await self._close(CLOSE_NORMAL if code == 1005 else code)
            self._closed = True
            raise LinkClosed(f"{self.description} closed the connection")
        # Unsolicited pongs are allowed and mean nothing.

    async def _close(self, code: int, reason: str = "") -> None:
        if not self._closed and not self._close_sent:
            with contextlib.suppress(LinkClosed):
                await self._send_frame(OP_CLOSE, close_payload(code, reason))
        self._closed = True

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self._close(CLOSE_NORMAL)
            await self._stream.aclose()


async def _read_http_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    """The HTTP head of an upgrade (up to its blank line) and the bytes after it,
    which are WebSocket frames and so not wsproto's to parse."""
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            return bytes(buffer[: end + 4]), bytes(buffer[end + 4 :])
        if len(buffer) > MAX_HTTP_HEAD_BYTES:
            raise WebSocketError("HTTP head of the WebSocket upgrade is too long")
        data = await stream.receive_some(RECEIVE_BUFFER_BYTES)
        if not data:
            raise WebSocketError("connection closed during the WebSocket upgrade")
        buffer += data


def _upgrade_event(ws: WSConnection, head: bytes) -> Event:
    try:
        ws.receive_data(head)
        events = list(ws.events())
    except RemoteProtocolError as exc:
        raise WebSocketError(f"bad WebSocket upgrade: {exc}") from exc
    if not events:
        raise WebSocketError("incomplete WebSocket upgrade")
    return events[0]


async def connect_websocket(host: str, port: int, path: str, timeout: float) -> WsLink:
    """Dial ``ws://host:port/path``.

    Raises:
        PeerUnavailable: no connection, or the upgrade was refused.
    """
    description = f"ws://{host}:{port}{path}"
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise PeerUnavailable(f"cannot connect to {description}: {exc}") from exc
    ws = WSConnection(ConnectionType.CLIENT)
    try:
        with trio.fail_after(timeout):
            await stream.send_all(ws.send(Request(host=f"{host}:{port}", target=path)))
            head, leftover = await _read_http_head(stream)
        first = _upgrade_event(ws, head)
        if isinstance(first, RejectConnection):
            raise WebSocketError(
                f"{description} refused the WebSocket upgrade ({first.status_code})"
            )
        if not isinstance(first, AcceptConnection):
            raise WebSocketError(f"{description} answered the upgrade with {type(first).__name__}")
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        if isinstance(exc, trio.TooSlowError | OSError | trio.BrokenResourceError):
            raise PeerUnavailable(f"cannot open a WebSocket to {description}: {exc!r}") from exc
        raise
    return WsLink(stream, client=True, description=description, leftover=leftover)


async def _refuse(stream: trio.SocketStream, ws: WSConnection, path: str) -> None:
    """Answer an upgrade to another path with a 404 that names ours."""
    body = f"dnet speaks on {path}\n".encode()
    reject = RejectConnection(
        status_code=404,
        has_body=True,
        headers=[(b"content-length", str(len(body)).encode())],
    )
    await stream.send_all(ws.send(reject) + ws.send(RejectData(data=body)))
    await stream.aclose()


_dropped = RateLimitedLog(log)


def _describe(stream: trio.SocketStream) -> tuple[str, str]:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "?", "?"
    return str(peer[0]), f"{peer[0]}:{peer[1]}"


async def _upgrade(
    stream: trio.SocketStream, path: str, timeout: float, description: str
) -> WsLink | None:
    """The upgraded link, or None (the stream closed) when it is not a WebSocket
    upgrade to ``path`` within ``timeout``."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        with trio.fail_after(timeout):
            head, leftover = await _read_http_head(stream)
        request = _upgrade_event(ws, head)
        if not isinstance(request, Request):
            raise WebSocketError(f"expected a WebSocket upgrade, got {type(request).__name__}")
        if request.target != path:
            await _refuse(stream, ws, path)
            return None
        await stream.send_all(ws.send(AcceptConnection()))
    except (
        WebSocketError,
        trio.TooSlowError,
        trio.BrokenResourceError,
        LocalProtocolError,
    ) as exc:
        _dropped(logging.INFO, "dropped a connection from %s: %s", description, exc)
        await stream.aclose()
        return None
    return WsLink(stream, client=False, description=description, leftover=leftover)


async def serve_websocket(
    handler: Callable[[WsLink], Awaitable[Any]],
    host: str,
    port: int,
    path: str,
    *,
    timeout: float = 10.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept WebSocket upgrades on ``path``; each link goes to ``handler`` in its
    own task, and is closed when the handler returns. A source address holds at
    most ``MAX_CONNECTIONS_PER_SOURCE`` connections; refusals are logged at a
    bounded rate."""
    caps = SourceCaps()

    async def accept(stream: trio.SocketStream) -> None:
        source, description = _describe(stream)
        try:
            with caps.hold(source):
                link = await _upgrade(stream, path, timeout, description)
                if link is None:
                    return
                try:
                    await handler(link)
                except Exception:
                    # A bug met by one connection must not take the listener (and
                    # every other connection) down with it.
                    log.exception("connection from %s failed", description)
                finally:
                    await link.aclose()
        except TooManyConnections as exc:
            _dropped(logging.INFO, "dropped a connection from %s: %s", description, exc)
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        await trio.serve_listeners(accept, listeners, handler_nursery=nursery)
