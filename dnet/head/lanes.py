"""Decode lanes: which running requests step together around the ring.

Every request that has its first token joins a lane (the one with the fewest
members) and stays there. A lane has at most one step in flight; when that step's
tokens come back, all its members that are still running go round again as one
batch, joined at the end by members whose prefill finished meanwhile. Rows stay in
order from step to step, so peers reuse their batch caches; a request that leaves
is dropped from its row.

With one lane per machine of the ring, each machine has a batch to run while the
others run theirs. Peers on one machine share its memory bandwidth, and every
batch reads all the weights, so there one lane is best. Pure state, no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import attrs


@attrs.frozen
class StepPlan:
    """One step to send: row ``i`` feeds ``tokens[i]`` to ``request_ids[i]`` at
    ``positions[i]``."""

    step: int
    request_ids: tuple[str, ...]
    positions: tuple[int, ...]
    tokens: tuple[int, ...]


@attrs.define(eq=False)
class _Member:
    rid: str
    position: int
    token: int | None  # the input of its next step; None while one is out


@attrs.define(eq=False)
class _Lane:
    members: list[_Member] = attrs.Factory(list)
    step: int | None = None  # the step in flight
    outstanding: set[str] = attrs.Factory(set)


class Lanes:
    """``join`` requests, take ``ready`` steps to send, report each step's tokens
    with ``finished`` and departures with ``leave``."""

    def __init__(self, count: int = 1, steps: Iterable[int] | None = None) -> None:
        if count < 1:
            raise ValueError("at least one lane")
        self._lanes = [_Lane() for _ in range(count)]
        self._where: dict[str, _Lane] = {}
        self._steps = iter(steps) if steps is not None else itertools.count()

    def __contains__(self, rid: str) -> bool:
        return rid in self._where

    @property
    def count(self) -> int:
        return len(self._lanes)

    def sizes(self) -> list[int]:
        return [len(lane.members) for lane in self._lanes]

    def join(self, rid: str, position: int, token: int) -> None:
        """Add a request whose next step feeds ``token`` at ``position``."""
        if rid in self._where:
            raise ValueError(f"request {rid!r} is already in a lane")
        lane = min(self._lanes, key=lambda lane: len(lane.members))
        lane.members.append(_Member(rid, position, token))
        self._where[rid] = lane

    def leave(self, rid: str) -> None:
        """Drop a request (finished, failed or gone). Unknown ids are ignored."""
        lane = self._where.pop(rid, None)
        if lane is None:
            return
        lane.members = [m for m in lane.members if m.rid != rid]
        lane.outstanding.discard(rid)
        if lane.step is not None and not lane.outstanding:
            lane.step = None  # nobody waits for that step any more

    def ready(self) -> list[StepPlan]:
        """The steps to send now: one per idle lane with members to run."""
        plans = []
        for lane in self._lanes:
            if lane.step is not None:
                continue
            rows = [m for m in lane.members if m.token is not None]
            if not rows:
                continue
            plan = StepPlan(
                next(self._steps),
                tuple(m.rid for m in rows),
                tuple(m.position for m in rows),
                tuple(m.token for m in rows if m.token is not None),
            )
            for m in rows:
                m.token = None
                m.position += 1
            lane.step, lane.outstanding = plan.step, set(plan.request_ids)
            plans.append(plan)
        return plans

    def finished(self, step: int, tokens: Sequence[tuple[str, int, bool]]) -> list[str]:
        """Step ``step`` came back with ``(request id, token, last)`` rows. Returns
        the requests that were in the step, are still here, and got no token: the
        ring dropped them, and the caller should fail them."""
        lane = next((lane for lane in self._lanes if lane.step == step), None)
        if lane is None:
            return []  # a step nobody waits for
        by_rid = {m.rid: m for m in lane.members}
        for rid, token, last in tokens:
            member = by_rid.get(rid)
            if member is None or rid not in lane.outstanding:
                continue
            lane.outstanding.discard(rid)
            if last:
                self.leave(rid)
            else:
                member.token = token
        missing = sorted(lane.outstanding)
        lane.step, lane.outstanding = None, set()
        return missing
