"""``PeerClient``: the head's end of one authenticated connection to a peer.

Replies to control calls (status, load, unload) come back in order on the same
connection; tokens and per-request errors are handed to the ring's sessions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TypeVar

import attrs
import trio

from dnet.errors import PeerError, PeerUnavailable
from dnet.protocol.codec import ProtocolError
from dnet.protocol.messages import (
    Error,
    FetchProgress,
    FetchSpan,
    LoadProgress,
    Message,
    Ping,
    Pong,
    Status,
    StatusRequest,
    StepTokens,
    Token,
)
from dnet.transport.connection import Connection
from dnet.transport.links import LinkClosed

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 600.0
R = TypeVar("R", bound=Message)  # loading a large slice from disk can take minutes


@attrs.frozen
class PingTimes:
    """Seconds: the round trip, and each way (one host's monotonic clock)."""

    round_trip: float
    to_peer: float
    from_peer: float


class PeerClient:
    def __init__(self, conn: Connection, address: str) -> None:
        self.conn = conn
        self.address = address
        self.peer_id = conn.remote_peer_id
        self.name = conn.remote_name
        self.alive = True
        self.gone_why: str | None = None  # set by whoever closes it on purpose
        self._lock = trio.Lock()
        self._seq = 0
        self.on_progress: Callable[[PeerClient, LoadProgress | FetchProgress], None] | None = None
        # Weights the peer asks for while it loads (``dnet.head.spans``).
        self.on_fetch: Callable[[PeerClient, FetchSpan], None] | None = None
        self._pong_arrived_ns = 0
        self._abandoned = 0  # replies still to come for callers that gave up
        self._reply_send, self._reply_receive = trio.open_memory_channel[Message](math.inf)

    def __repr__(self) -> str:
        return f"<PeerClient {self.label}>"

    @property
    def label(self) -> str:
        return f"{self.name or 'peer'} ({self.peer_id[:12]}) at {self.address}"

    async def serve(
        self,
        on_request_message: Callable[[Token | StepTokens | Error], None],
        on_closed: Callable[[PeerClient, str], None],
    ) -> None:
        """Read the connection until it closes; runs as a task of the ring."""
        why = "closed the connection"
        try:
            while True:
                message, _ = await self.conn.receive()
                if isinstance(message, Token | StepTokens) or (
                    isinstance(message, Error) and message.request_id
                ):
                    on_request_message(message)
                elif isinstance(message, LoadProgress | FetchProgress):
                    if self.on_progress is not None:
                        self.on_progress(self, message)
                elif isinstance(message, FetchSpan):
                    if self.on_fetch is not None:
                        self.on_fetch(self, message)
                else:
                    if isinstance(message, Pong):
                        self._pong_arrived_ns = time.monotonic_ns()
                    self._reply_send.send_nowait(message)
        except LinkClosed:
            pass
        except ProtocolError as exc:
            why = f"sent a bad frame ({exc.message})"
            await self.conn.fail(exc)
        finally:
            self.alive = False
            self._reply_send.close()
            on_closed(self, self.gone_why or why)

    async def _round_trip(
        self, make: Callable[[], Message], payload: bytes, timeout: float
    ) -> tuple[Message, Message]:
        """Send ``make()`` (built under the lock, so pings number in sending order)
        and return it with its reply.

        Replies come in order; a caller that gave up (cancelled, timed out) after
        sending leaves its reply to come, which the next caller drops first."""
        async with self._lock:
            message = make()
            try:
                await self.conn.send(message, payload)
                try:
                    with trio.fail_after(timeout):
                        while self._abandoned:
                            await self._reply_receive.receive()
                            self._abandoned -= 1
                        return message, await self._reply_receive.receive()
                except BaseException:
                    self._abandoned += 1
                    raise
            except (LinkClosed, trio.EndOfChannel, trio.ClosedResourceError) as exc:
                raise PeerUnavailable(f"peer {self.label} went away") from exc
            except trio.TooSlowError:
                raise PeerUnavailable(
                    f"peer {self.label} did not answer {type(message).__name__} in {timeout:.0f}s"
                ) from None

    async def call(
        self, message: Message, expect: type[R], timeout: float = CONTROL_TIMEOUT_S
    ) -> R:
        """Send a control message and wait for its reply, of type ``expect``.

        Raises:
            PeerUnavailable: the peer went away; PeerError: it answered with an error,
                or with something else than ``expect``.
        """
        _, reply = await self._round_trip(lambda: message, b"", timeout)
        if isinstance(reply, Error):
            raise PeerError(f"peer {self.label}: {reply.message}", reply.code, self.peer_id)
        if not isinstance(reply, expect):
            raise PeerError(
                f"peer {self.label} answered {type(message).__name__} with "
                f"{type(reply).__name__}, not {expect.__name__}",
                "bad_reply",
                self.peer_id,
            )
        return reply

    async def ping(self, payload: bytes = b"", timeout: float = 10.0) -> PingTimes:
        """Time a ``Ping`` carrying ``payload`` there and its ``Pong`` back.

        The one-way figures compare monotonic clocks, so they mean something only
        when the peer runs on this host. ``from_peer`` is the direction activations
        travel between peers (server to client, unmasked).

        Raises:
            PeerUnavailable, PeerError
        """

        def make() -> Ping:
            self._seq += 1
            return Ping(self._seq, time.monotonic_ns())

        ping, reply = await self._round_trip(make, payload, timeout)
        if not isinstance(ping, Ping) or not isinstance(reply, Pong) or reply.seq != ping.seq:
            raise PeerError(f"peer {self.label} answered a ping with {reply!r}")
        sent_ns = ping.sent_ns
        return PingTimes(
            (time.monotonic_ns() - sent_ns) / 1e9,
            (reply.received_ns - sent_ns) / 1e9,
            (self._pong_arrived_ns - reply.received_ns) / 1e9,
        )

    async def call_status(self, timeout: float = CONTROL_TIMEOUT_S) -> Status:
        return await self.call(StatusRequest(), Status, timeout)

    async def send(self, message: Message, payload: bytes = b"") -> None:
        """Raises:
        PeerUnavailable
        """
        try:
            await self.conn.send(message, payload)
        except LinkClosed as exc:
            raise PeerUnavailable(f"peer {self.label} went away") from exc
