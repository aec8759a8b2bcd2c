"""Putting a model's slices on its peers: a plan (which peer holds which layers),
``LoadSlice`` to each at once naming by manifest the spans it reads (peers fetch
what they lack from this head), and unloading them again, also after a failure."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

import attrs
import trio

from dnet.errors import DnetError, LayerRangeError
from dnet.head.peers import PeerClient
from dnet.models.manifest import Manifest, slice_files
from dnet.models.model_dir import ModelDir
from dnet.protocol.messages import (
    FetchProgress,
    Have,
    HaveRequest,
    Holder,
    Loaded,
    LoadProgress,
    LoadSlice,
    Unload,
    Unloaded,
)

log = logging.getLogger(__name__)

UNLOAD_TIMEOUT_S = 30.0
HAVE_TIMEOUT_S = 10.0


@attrs.frozen
class PeerLoading:
    """Where one peer's load stands: ``fetching`` its weights (``done`` of ``total``
    bytes it lacked, from ``source`` at ``rate`` bytes/s), then ``reading`` them
    (``done`` of ``total`` parts)."""

    phase: str
    done: int
    total: int
    source: str = ""
    rate: float = 0.0


Progress = Callable[[str, PeerLoading], None]  # (peer id, where its load stands)


@attrs.frozen
class PlanEntry:
    """One slice of a plan: which peer (by peer id) holds layers ``[start, end)``."""

    peer_id: str
    start: int
    end: int


def check_plan(plan: Sequence[PlanEntry], num_layers: int) -> None:
    """Raises:
    LayerRangeError: the ranges do not tile ``[0, num_layers)`` in order.
    """
    expected = 0
    for entry in plan:
        if entry.start != expected or entry.end <= entry.start:
            raise LayerRangeError(f"plan {list(plan)} does not tile the layers at {expected}")
        expected = entry.end
    if expected != num_layers:
        raise LayerRangeError(f"plan covers {expected} of {num_layers} layers")


def slice_message(
    model: ModelDir,
    manifest: Manifest,
    plan: Sequence[PlanEntry],
    order: Sequence[PeerClient],
    i: int,
) -> LoadSlice:
    """The ``LoadSlice`` of the ``i``-th peer of the ring: its layers, its
    neighbours, and the spans of the model files it reads."""
    prev = order[i - 1] if i > 0 else None
    nxt = order[i + 1] if i + 1 < len(order) else None
    return LoadSlice(
        model=str(model.path),
        start=plan[i].start,
        end=plan[i].end,
        is_first=prev is None,
        is_last=nxt is None,
        prev_address=prev.address if prev else None,
        prev_peer_id=prev.peer_id if prev else None,
        next_peer_id=nxt.peer_id if nxt else None,
        model_id=manifest.model_id,
        files=slice_files(manifest, model, plan[i].start, plan[i].end),
        hub=manifest.hub,
    )


async def find_holders(peers: Sequence[PeerClient], model_id: str) -> tuple[Holder, ...]:
    """The connected peers whose stores hold spans of ``model_id``: where peers that
    lack them may fetch them (a peer that does not answer is left out)."""
    found: list[Holder] = []

    async def ask(p: PeerClient) -> None:
        with suppress(DnetError), trio.move_on_after(HAVE_TIMEOUT_S):
            have = await p.call(HaveRequest(model_id), Have)
            if have.spans:
                found.append(Holder(p.address, p.peer_id, p.name))

    async with trio.open_nursery() as nursery:
        for p in peers:
            nursery.start_soon(ask, p)
    return tuple(sorted(found, key=lambda h: h.peer_id))


async def load_slices(
    model: ModelDir,
    manifest: Manifest,
    plan: Sequence[PlanEntry],
    order: Sequence[PeerClient],
    *,
    max_context: int | None,
    compute_dtype: str | None,
    on_progress: Progress | None = None,
    holders: Sequence[Holder] = (),
) -> list[Loaded]:
    """Send every peer its ``LoadSlice`` at once, naming by ``manifest`` the spans
    of the model files its slice reads, and where else they are (the hub, the
    ``holders``); peers fetch what they lack, from this head last. The replies in
    ring order; the first failure calls the other loads off.

    Raises:
        PeerUnavailable, PeerError: the first failure; what did load is unloaded.
    """
    results: list[Loaded | None] = [None] * len(plan)
    errors: list[DnetError] = []

    async def load_one(i: int, cancel: trio.CancelScope) -> None:
        message = attrs.evolve(
            slice_message(model, manifest, plan, order, i),
            max_context=max_context,
            compute_dtype=compute_dtype,
            holders=tuple(h for h in holders if h.peer_id != order[i].peer_id),
        )
        try:
            results[i] = await order[i].call(message, Loaded)
        except DnetError as exc:
            errors.append(exc)
            cancel.cancel()  # the others wait for nothing: their peers are unloaded below

    def progress(client: PeerClient, msg: LoadProgress | FetchProgress) -> None:
        if on_progress is None:
            return
        if isinstance(msg, FetchProgress):
            step = PeerLoading("fetching", msg.done, msg.total, msg.source, msg.rate)
        else:
            step = PeerLoading("reading", msg.done, msg.total)
        on_progress(client.peer_id, step)

    for p in order:
        p.on_progress = progress
    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(plan)):
                nursery.start_soon(load_one, i, nursery.cancel_scope)
        if errors:
            raise errors[0]
    except BaseException:
        with quietly():
            await unload_slices(order)
        raise
    finally:
        for p in order:
            p.on_progress = None
    return [r for r in results if r is not None]


@contextmanager
def quietly() -> Iterator[None]:
    """For cleanup (after a failure, on exit): shielded, bounded, errors ignored."""
    with trio.CancelScope(shield=True), trio.move_on_after(UNLOAD_TIMEOUT_S), suppress(DnetError):
        yield


async def unload_slices(order: Sequence[PeerClient]) -> None:
    for p in order:
        if p.alive:
            await p.call(Unload(), Unloaded)
