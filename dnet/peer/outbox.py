"""The peer's outbox: messages for the next peer of the ring or for the head that
loaded this slice, sent in order by one task. A request whose message cannot reach
the next peer is reported to the head as failed, so it never waits for a token."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import attrs
import trio

from dnet.errors import PeerUnavailable
from dnet.protocol.messages import Error, Message, Step
from dnet.transport.connection import Connection
from dnet.transport.links import LinkClosed


class Route(enum.Enum):
    """Where an outgoing message goes."""

    NEXT = "next"  # the successor in the ring
    CONTROLLER = "controller"  # the head that loaded this slice


@attrs.frozen
class Outgoing:
    route: Route
    message: Message
    payload: bytes = b""


def _request_ids(message: Message) -> tuple[str, ...]:
    if isinstance(message, Step):
        return message.request_ids
    rid = getattr(message, "request_id", None)
    return (rid,) if rid else ()


class Outbox:
    """Queue with ``to_next``/``to_controller`` (any thread's Trio callbacks, no
    waiting); ``serve`` sends, for the daemon's life."""

    def __init__(
        self,
        peer_id: str,
        successor: Callable[[], Connection | None],
        controller: Callable[[], Connection | None],
        successor_id: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._peer_id = peer_id
        self._successor = successor
        self._controller = controller
        self._successor_id = successor_id
        self._send, self._receive = trio.open_memory_channel[Outgoing](math.inf)

    def to_next(self, message: Message, payload: bytes = b"") -> None:
        self._send.send_nowait(Outgoing(Route.NEXT, message, payload))

    def to_controller(self, message: Message) -> None:
        self._send.send_nowait(Outgoing(Route.CONTROLLER, message))

    async def serve(self) -> None:
        async for out in self._receive:
            nxt = out.route is Route.NEXT
            conn = self._successor() if nxt else self._controller()
            rids = _request_ids(out.message) if nxt else ()
            if conn is None:
                who = self._successor_id()
                for rid in rids:
                    self._report(rid, f"the next peer {(who or '?')[:12]} is not connected")
                continue
            try:
                await conn.send(out.message, out.payload)
            except LinkClosed:
                for rid in rids:
                    self._report(
                        rid,
                        f"the next peer {conn.remote_name} ({conn.remote_peer_id[:12]}) is gone",
                    )

    def _report(self, rid: str, why: str) -> None:
        self.to_controller(Error(PeerUnavailable.code, why, rid, self._peer_id))
