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


async def test_slices_run_on_the_compute_thread_from_trio(tiny_model):
    """The way a peer uses the runtime: load and run on the compute thread, many
    requests interleaved by Trio tasks, each getting its own greedy answer."""
    from dnet.runtime.local import generate, load_chain

    path = tiny_model(arch="qwen3")
    prompts = [[5, 9, 13, 200, 4], [300, 2, 2, 41, 7], [11, 12]]
    async with open_compute_thread() as compute:
        engines = await compute.run(load_chain, path, [(0, 2), (2, 4)])
        expected = [
            await compute.run(lambda p=p: [t.token_id for t in generate(engines, p, 8)])
            for p in prompts
        ]
        results: dict[int, list[int]] = {}

        async def one(i: int, prompt: list[int]) -> None:
            rid = f"r{i}"
            for e in engines:
                await compute.run(e.start, rid)
            tokens: list[int] = []
            x: object = prompt
            pos = 0
            for _ in range(8):
                for e in engines:
                    x = await compute.run(lambda e=e, x=x, pos=pos: e.run(rid, x, position=pos))
                pos += len(prompt) if pos == 0 else 1
                tokens.append(x.token_id)
                x = [x.token_id]
            for e in engines:
                await compute.run(e.end, rid)
            results[i] = tokens

        async with trio.open_nursery() as nursery:
            for i, p in enumerate(prompts):
                nursery.start_soon(one, i, p)
    assert [results[i] for i in range(len(prompts))] == expected
