"""An exact dynamic program over (next layer, devices used, last device).

Each step gives the next contiguous range of layers to a device not used yet, so a
plan is an ordered subset of devices with contiguous ranges: exactly the ring
orders and cuts there are. The objectives combine monotonically (a sum for latency,
a max for throughput), so keeping the best partial plan per state is exact. States
grow as ``layers * 2**devices * devices``: fine for the clusters of a home or a lab
(a dozen devices); beyond that, a MILP would be the next step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

from dnet.solver.plan import Assignment, Exclusion, Plan
from dnet.solver.profiles import (
    HEAD,
    LOOPBACK,
    DeviceProfile,
    LinkProfile,
    ModelProfile,
    NoFeasiblePlan,
)

OBJECTIVES = ("latency", "throughput")
TOKEN_BYTES = 16  # a sampled token (or a token id) on the wire, roughly
MAX_DEVICES = 12
HEADROOM = 0.1  # of each device's memory the solver keeps free


class _Costs:
    """Per-range costs in O(1) from prefix sums."""

    def __init__(self, model: ModelProfile, context: int) -> None:
        self.m = model
        self.context = context
        self.bytes = [0, *accumulate(model.layer_bytes)]
        self.flops = [0, *accumulate(model.layer_flops)]
        self.kv = [0, *accumulate(model.kv_bytes_per_token)]

    def memory(self, a: int, b: int) -> int:
        """``ModelProfile.slice_memory`` in O(1)."""
        total = self.bytes[b] - self.bytes[a] + (self.kv[b] - self.kv[a]) * self.context
        return total + self.m.edge_bytes(a, b)

    def read_bytes(self, a: int, b: int) -> int:
        last = b == self.m.num_layers
        return (
            self.bytes[b] - self.bytes[a] + (self.m.head_bytes + self.m.norm_bytes if last else 0)
        )

    def stage_s(self, d: DeviceProfile, a: int, b: int, positions: int = 1) -> float:
        """Decode (``positions == 1``) is bound by bytes read; prefill by FLOPs."""
        last = b == self.m.num_layers
        flops = (self.flops[b] - self.flops[a]) * positions + (self.m.head_flops if last else 0)
        bound = max(self.read_bytes(a, b) / d.bandwidth_bytes_s, flops / d.flops_s)
        return bound + (b - a) * d.layer_overhead_s


def _link(links: Mapping[tuple[str, str], LinkProfile], src: str, dst: str) -> LinkProfile:
    return links.get((src, dst), LOOPBACK if src == dst else links.get((dst, src), LOOPBACK))


def solve(
    model: ModelProfile,
    devices: Sequence[DeviceProfile],
    links: Mapping[tuple[str, str], LinkProfile] | None = None,
    *,
    context: int = 4096,
    objective: str = "latency",
    headroom: float = HEADROOM,
    prompt_tokens: int = 512,
) -> Plan:
    """The best plan for ``objective``: ``latency`` (one decode step around the ring,
    links included) or ``throughput`` (the slowest stage, for pipelined streams).

    ``links[(a, b)]`` is the link from peer id ``a`` to ``b`` (``HEAD`` for the head);
    a missing link counts as loopback. Each device keeps ``headroom`` of its memory
    free. Deterministic: ties go to the device order given.

    Raises:
        NoFeasiblePlan: nothing fits; the error states the shortfall in bytes.
        ValueError: unknown objective, no devices, or too many for the exact search.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if not devices:
        raise NoFeasiblePlan("no devices to place the model on", model.weight_bytes)
    if len(devices) > MAX_DEVICES:
        raise ValueError(
            f"the exact search handles up to {MAX_DEVICES} devices, got {len(devices)}"
        )
    links = links or {}
    costs = _Costs(model, context)
    n, nd = model.num_layers, len(devices)
    budgets = [int(d.memory_bytes * (1 - headroom)) for d in devices]
    act = model.activation_bytes

    def link_in(prev: int, e: int) -> float:
        if prev < 0:
            return _link(links, HEAD, devices[e].peer_id).transfer_s(TOKEN_BYTES)
        return _link(links, devices[prev].peer_id, devices[e].peer_id).transfer_s(act)

    def link_out(e: int) -> float:
        return _link(links, devices[e].peer_id, HEAD).transfer_s(TOKEN_BYTES)

    # state (layer, used mask, last device) -> the Pareto front of partial plans, each
    # (key, total latency, back pointer). For latency the key is the total alone and
    # the front holds one plan; for throughput it is (slowest stage, total), and a
    # plan slower so far may still finish with the lower total, so keep the front.
    fronts: dict[tuple[int, int, int], list[_Entry]] = {(0, 0, -1): [((0.0,), 0.0, None)]}
    for layer in range(n):
        for (_, used, prev), entries in sorted((k, v) for k, v in fronts.items() if k[0] == layer):
            for entry in list(entries):
                key, total, _ = entry
                for e in range(nd):
                    if used >> e & 1:
                        continue
                    hop = link_in(prev, e)
                    for b in range(layer + 1, n + 1):
                        if costs.memory(layer, b) > budgets[e]:
                            break
                        stage = costs.stage_s(devices[e], layer, b) + hop
                        out = link_out(e) if b == n else 0.0
                        new_total = total + stage + out
                        if objective == "latency":
                            new_key: tuple[float, ...] = (new_total,)
                        else:
                            new_key = (max(key[0], stage + out), new_total)
                        _add(
                            fronts.setdefault((b, used | 1 << e, e), []),
                            (new_key, new_total, (entry, e, layer, b)),
                        )
    finals = sorted(
        (entry[0], state, i)
        for state, entries in fronts.items()
        if state[0] == n and state[1]
        for i, entry in enumerate(entries)
    )
    if not finals:
        raise _shortfall(model, costs, devices, budgets, context)
    _, state, i = finals[0]
    return _plan(
        model, costs, devices, budgets, fronts[state][i], objective, context, prompt_tokens, links
    )


_Entry = tuple[tuple[float, ...], float, Any]


def _add(front: list[_Entry], entry: _Entry) -> None:
    """Keep ``front`` the set of plans no other plan matches or beats on every count."""
    key = entry[0]
    if any(all(a <= b for a, b in zip(k, key, strict=True)) for k, _, _ in front):
        return
    front[:] = [e for e in front if not all(a <= b for a, b in zip(key, e[0], strict=True))]
    front.append(entry)


def _shortfall(
    model: ModelProfile,
    costs: _Costs,
    devices: Sequence[DeviceProfile],
    budgets: list[int],
    context: int,
) -> NoFeasiblePlan:
    need = costs.memory(0, model.num_layers)
    have = sum(budgets)
    biggest_layer = max(costs.memory(i, i + 1) for i in range(model.num_layers))
    short = max(need - have, biggest_layer - max(budgets), 1)
    return NoFeasiblePlan(
        f"the model needs {need} bytes at a context of {context} (weights and KV cache); "
        f"{len(devices)} device(s) offer {have} after headroom, and the largest layer needs "
        f"{biggest_layer} on one device (the largest offers {max(budgets)}): short by {short} bytes",
        short,
    )


def _plan(
    model: ModelProfile,
    costs: _Costs,
    devices: Sequence[DeviceProfile],
    budgets: list[int],
    final: _Entry,
    objective: str,
    context: int,
    prompt_tokens: int,
    links: Mapping[tuple[str, str], LinkProfile],
) -> Plan:
    steps = []
    cursor: _Entry | None = final
    while cursor is not None and cursor[2] is not None:
        parent, e, a, b = cursor[2]
        steps.append((e, a, b))
        cursor = parent
    steps.reverse()
    assignments = tuple(
        Assignment(
            devices[e].peer_id,
            devices[e].name,
            a,
            b,
            costs.stage_s(devices[e], a, b),
            costs.memory(a, b),
        )
        for e, a, b in steps
    )
    key, total, _ = final
    # Prefill: the prompt's positions pass every stage and link once (no overlap).
    ttft = 0.0
    prev_id = HEAD
    for e, a, b in steps:
        size = (
            TOKEN_BYTES * prompt_tokens
            if prev_id == HEAD
            else model.activation_bytes * prompt_tokens
        )
        ttft += _link(links, prev_id, devices[e].peer_id).transfer_s(size)
        ttft += costs.stage_s(devices[e], a, b, positions=prompt_tokens)
        prev_id = devices[e].peer_id
    ttft += _link(links, prev_id, HEAD).transfer_s(TOKEN_BYTES)
    used = {e for e, _, _ in steps}
    excluded = []
    for i, d in enumerate(devices):
        if i in used:
            continue
        smallest = min(costs.memory(a, a + 1) for a in range(model.num_layers))
        if smallest > budgets[i]:
            reason = f"cannot hold even one layer: needs {smallest} bytes, has {budgets[i]} after headroom"
        else:
            reason = f"the plan predicts faster without it ({objective})"
        excluded.append(Exclusion(d.peer_id, d.name, reason))
    rate = 1.0 / total if objective == "latency" else 1.0 / key[0]
    split = _split_reason(costs, budgets, objective) if len(steps) > 1 else None
    return Plan(
        objective, assignments, tuple(excluded), total, rate, ttft, prompt_tokens, context, split
    )


def _split_reason(costs: _Costs, budgets: list[int], objective: str) -> str:
    whole = costs.memory(0, costs.m.num_layers)
    if whole > max(budgets):
        return (
            f"no single peer can hold the whole model: it needs {_mib(whole)} at a context "
            f"of {costs.context} (weights and KV cache), and the most one peer offers is "
            f"{_mib(max(budgets))} (its free memory or --max-memory, less headroom)"
        )
    return f"splitting is predicted faster than any single peer ({objective})"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"
