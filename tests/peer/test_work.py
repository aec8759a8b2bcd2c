"""The peer's work order: ends first, steps and prefill chunks take turns."""

from __future__ import annotations

import time

import pytest
import trio

from dnet.peer.work import WorkQueue
from dnet.protocol.messages import Activation, Cancel, EndRequest, StartRequest, Step, Token


def _chunk(rid, pos=0):
    return Activation(rid, pos, "int32", (1, 4))


def _step(n):
    return Step(n, ("a",), (n,), "int32", (1, 1))


def _drain(q):
    out = []
    while (work := q.take()) is not None:
        out.append(work[0])
    return out


def test_steps_and_prefill_take_turns_and_ends_go_first():
    q = WorkQueue()
    q.put(StartRequest("p"))
    for i in range(3):
        q.put(_chunk("p", 4 * i))
    for i in range(3):
        q.put(_step(i))
    q.put(EndRequest("x"))
    order = _drain(q)
    assert order[0] == EndRequest("x") and order[1] == StartRequest("p")
    kinds = ["step" if isinstance(m, Step) else "chunk" for m in order[2:]]
    assert kinds == ["step", "chunk", "step", "chunk", "step", "chunk"]
    # Each request's own work keeps its order.
    assert [m.position for m in order if isinstance(m, Activation)] == [0, 4, 8]
    assert [m.step for m in order if isinstance(m, Step)] == [0, 1, 2]


def test_only_steps_or_only_prefill_run_back_to_back():
    q = WorkQueue()
    for i in range(3):
        q.put(_step(i))
    assert [m.step for m in _drain(q)] == [0, 1, 2]
    for i in range(3):
        q.put(_chunk("p", i))
    assert len(_drain(q)) == 3


def test_cancel_drops_the_requests_queued_prefill():
    q = WorkQueue()
    q.put(StartRequest("p"))
    q.put(_chunk("p"))
    q.put(_chunk("other"))
    q.put(Cancel("p"))
    assert _drain(q) == [Cancel("p"), _chunk("other")]
    with pytest.raises(TypeError):
        q.put(Token("r", 1, 0.0))


async def test_get_waits_for_work():
    q = WorkQueue()
    got = []

    async def worker():
        got.append(await q.get())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker)
        await trio.testing.wait_all_tasks_blocked()
        assert not got
        q.put(_step(7))
    assert got == [(_step(7), b"")]


def test_a_paused_chunk_takes_the_waiting_steps_out_of_turn():
    q = WorkQueue()
    q.put(_chunk("p", 0))
    q.put(_chunk("p", 4))
    assert not q.has_steps() and q.take_step() is None
    assert q.take() == (_chunk("p", 0), b"")  # now running, and steps arrive
    q.put(_step(0))
    q.put(_step(1))
    assert q.has_steps()
    assert [q.take_step()[0].step, q.take_step()[0].step] == [0, 1]
    assert q.take_step() is None and not q.has_steps()
    # A step ran last: the next chunk is next.
    q.put(_step(2))
    assert [type(m).__name__ for m in _drain(q)] == ["Activation", "Step"]


def test_a_chunk_pauses_for_steps_only_after_its_slice():
    from dnet.peer.request_work import _Pause

    waiting = [True]
    pause = _Pause(lambda: waiting[0], 0.05)
    assert not pause()  # steps wait, but the chunk has only just started
    time.sleep(0.06)
    assert pause()
    waiting[0] = False
    assert not pause()  # nothing waits
    waiting[0] = True
    pause.restart()  # after the steps ran, the chunk gets a full slice again
    assert not pause()
    assert _Pause(lambda: True, 0.0)()  # a zero slice: every layer, as before
