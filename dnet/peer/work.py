"""The order a peer runs request work in.

Ends and cancels go first (they free memory and drop the request's queued prefill).
Decode steps and prefill chunks take turns when both wait, and a peer running a
chunk lets waiting steps through between two of its layers (``take_step``, once the
chunk has had its time slice: ``dnet.peer.daemon.PREFILL_SLICE_S``), so a long
prompt holds a running batch back by about that slice, and a busy ring still
prefills. Work of one
request keeps its order: its ``StartRequest`` and chunks share one FIFO, and its
decode steps start only after its prefill has come back as a token.
"""

from __future__ import annotations

from collections import deque

import trio

from dnet.protocol.messages import Activation, Cancel, EndRequest, Message, StartRequest, Step

Work = tuple[Message, bytes]


class WorkQueue:
    """Request work in, the next job to run out (``get``)."""

    def __init__(self) -> None:
        self._urgent: deque[Work] = deque()
        self._steps: deque[Work] = deque()
        self._prefill: deque[Work] = deque()
        self._step_ran_last = False
        self._lot = trio.lowlevel.ParkingLot()

    def has_steps(self) -> bool:
        """Whether decode steps wait (safe to call from the compute thread)."""
        return bool(self._steps)

    def take_step(self) -> Work | None:
        """The next decode step, out of turn: for a peer that paused a prefill chunk
        between two layers to let waiting steps through."""
        if not self._steps:
            return None
        self._step_ran_last = True
        return self._steps.popleft()

    def put(self, message: Message, payload: bytes = b"") -> None:
        if isinstance(message, EndRequest | Cancel):
            rid = message.request_id
            self._prefill = deque(
                w for w in self._prefill if getattr(w[0], "request_id", None) != rid
            )
            self._urgent.append((message, payload))
        elif isinstance(message, Step):
            self._steps.append((message, payload))
        elif isinstance(message, StartRequest | Activation):
            self._prefill.append((message, payload))
        else:
            raise TypeError(f"{type(message).__name__} is not request work")
        self._lot.unpark_all()

    def take(self) -> Work | None:
        """The next job by the rules above, or ``None`` when there is none."""
        if self._urgent:
            return self._urgent.popleft()
        if self._prefill and isinstance(self._prefill[0][0], StartRequest):
            return self._prefill.popleft()  # cheap: it takes no turn
        if self._steps and not (self._prefill and self._step_ran_last):
            self._step_ran_last = True
            return self._steps.popleft()
        if self._prefill:
            self._step_ran_last = False
            return self._prefill.popleft()
        return None

    async def get(self) -> Work:
        while (work := self.take()) is None:
            await self._lot.park()
        return work
