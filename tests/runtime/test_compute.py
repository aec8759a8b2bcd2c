"""The compute thread: one thread for all MLX work, awaited without blocking Trio."""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import pytest
import trio

from dnet.runtime.compute import open_compute_thread


async def test_every_job_runs_on_the_same_thread():
    async with open_compute_thread() as compute:
        names = {await compute.run(lambda: threading.get_ident()) for _ in range(20)}
    assert len(names) == 1
    assert names != {threading.get_ident()}


async def test_lazy_arrays_survive_between_jobs():
    # An unevaluated array built in one job is evaluated in the next: only works
    # because both run on the same thread.
    async with open_compute_thread() as compute:
        lazy = await compute.run(lambda: mx.arange(10) * 2)
        total = await compute.run(lambda: mx.sum(lazy).item())
    assert total == 90


async def test_errors_come_back_to_the_caller():
    async with open_compute_thread() as compute:
        with pytest.raises(ZeroDivisionError):
            await compute.run(lambda: 1 / 0)
        assert await compute.run(lambda: 41 + 1) == 42


async def test_the_event_loop_keeps_running_during_a_job():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.01)

    async with open_compute_thread() as compute, trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await compute.run(time.sleep, 0.3)
        nursery.cancel_scope.cancel()
    assert ticks >= 10


async def test_cancel_waits_for_the_running_job_then_cancels():
    finished = threading.Event()

    def job():
        time.sleep(0.2)
        finished.set()
        return "done"

    async with open_compute_thread() as compute:
        with trio.move_on_after(0.05) as scope:
            await compute.run(job)
        assert scope.cancelled_caught
        # The job was not abandoned half-way: it finished before the caller left.
        assert finished.is_set()
        assert await compute.run(lambda: "next") == "next"


async def test_closed_thread_refuses_jobs():
    async with open_compute_thread() as compute:
        pass
    with pytest.raises(trio.ClosedResourceError):
        await compute.run(lambda: None)
