"""Recovery without an operator: the loaded model stays served as peers come and go.

- A peer of the ring is lost (it crashed, hung and failed its health check, or its
  link reset): its requests have already failed; the head re-plans the model on the
  peers that are left and loads it, so the next request is served.
- The peers of the topology the user loaded are all back: between requests, the
  head loads that topology again.
- A new peer appears while all is well: between requests, the head re-plans, and
  moves only if the new plan is predicted clearly faster.

Re-plans wait for membership to settle (``SETTLE_S``), so a burst of changes makes
one re-plan.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from dnet.errors import DnetError
from dnet.head.topology import Topology

if TYPE_CHECKING:
    from dnet.head.coordinator import Coordinator

log = logging.getLogger(__name__)

SETTLE_S = 0.5
FASTER = 1.25  # a healthy ring moves to a new plan only if predicted this much faster


async def serve_recovery(coordinator: Coordinator, settle_s: float = SETTLE_S) -> None:
    """Run for the head's life; see the module's description."""
    cluster = coordinator.cluster
    while True:
        changed = cluster.membership
        await changed.wait()
        await trio.sleep(settle_s)  # let a burst of joins and leaves settle
        try:
            await _after_change(coordinator)
        except DnetError as exc:
            log.error("could not re-plan %s: %s", coordinator.model_name(), exc.message)
            coordinator.set_replan(None)


def _peers_present(coordinator: Coordinator, topology: Topology) -> bool:
    connected = {p.peer_id for p in coordinator.cluster.peers if p.alive}
    return all(a.peer_id in connected for a in topology.assignments)


async def _after_change(coordinator: Coordinator) -> None:
    from dnet.head.coordinator import ModelState

    intended = coordinator.intended
    if coordinator.state is not ModelState.LOADED or intended is None:
        return
    ring = coordinator.ring
    if ring is None or not ring.healthy:
        lost = [p.label for p in (ring.order if ring else []) if not p.alive]
        if _peers_present(coordinator, intended):
            why = f"peers are back ({', '.join(lost)} reconnected)"
            await coordinator.replan(why, intended, fallback=False)
            return
        why = f"lost {', '.join(lost) or 'a peer'}"
        topology = await coordinator.prepare(
            coordinator.model_path(),
            context=intended.context,
            objective=intended.objective,
            compute_dtype=intended.compute_dtype,
        )
        await coordinator.replan(why, _named(topology, intended), fallback=True)
        return
    if not await _wait_idle(coordinator):
        return  # busy all along: the next change tries again
    if coordinator.on_fallback and _peers_present(coordinator, intended):
        await coordinator.replan("the topology's peers are all back", intended, fallback=False)
        return
    current = coordinator.topology
    in_use = {a.peer_id for a in current.assignments} if current else set()
    if current is None or {p.peer_id for p in coordinator.cluster.peers} <= in_use:
        return  # nobody new
    candidate = await coordinator.prepare(
        coordinator.model_path(),
        context=current.context,
        objective=current.objective,
        compute_dtype=current.compute_dtype,
    )
    faster = candidate.predicted_tokens_per_s >= FASTER * current.predicted_tokens_per_s
    if faster and not coordinator.serving.active:
        why = (
            f"a new plan is predicted {candidate.predicted_tokens_per_s:.1f} tok/s against "
            f"{current.predicted_tokens_per_s:.1f}"
        )
        await coordinator.replan(why, _named(candidate, current), fallback=False)


async def _wait_idle(coordinator: Coordinator, limit_s: float = 120.0) -> bool:
    """Wait (up to ``limit_s``) until no request runs: moves happen between them."""
    with trio.move_on_after(limit_s):
        while coordinator.serving.active:
            await coordinator.changed.wait()
        return True
    return False


def _named(topology: Topology, like: Topology) -> Topology:
    return attrs.evolve(topology, name=like.name)
