"""The one thread that runs all MLX work of a process, awaitable from Trio.

MLX arrays are tied to the thread that built them (an unevaluated array made on one
thread cannot be evaluated on another, and random state is per thread), so a pool
of threads will not do: every job runs on the same dedicated thread, in order.
Waiting for a job never blocks the Trio loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_STOP = object()


class ComputeThread:
    """A dedicated worker thread with a FIFO of jobs. Use ``open_compute_thread``."""

    def __init__(self, name: str = "dnet-compute") -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._closed = False

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, deliver = job
            deliver(outcome.capture(fn, *args))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the compute thread and return its result (or raise
        its exception). A job that has started runs to the end even if the caller
        is cancelled; the cancellation is delivered once it finishes."""
        if self._closed:
            raise trio.ClosedResourceError("the compute thread is closed")
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(out: outcome.Outcome[T]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, out)

        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            # MLX cannot be interrupted mid-job: the task stays until the job is
            # done, then Trio delivers the cancellation at its next checkpoint.
            return trio.lowlevel.Abort.FAILED

        self._jobs.put((fn, args, deliver))
        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        # A cancellation that arrived while the job ran is delivered now; the
        # job's result is dropped with it.
        await trio.lowlevel.checkpoint_if_cancelled()
        return result

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._jobs.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


@asynccontextmanager
async def open_compute_thread(name: str = "dnet-compute") -> AsyncIterator[ComputeThread]:
    """Start a compute thread; on exit, let queued jobs finish and stop it."""
    compute = ComputeThread(name)
    compute.start()
    try:
        yield compute
    finally:
        compute.close()
        # Shielded: the thread cannot be abandoned mid-job, and a Cancelled here
        # would mask whatever exception is on its way out.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(compute.join)
