"""The placement solver: exact (against brute force), feasible, monotone, clear."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnet.solver.profiles import HEAD, DeviceProfile, LinkProfile, ModelProfile, NoFeasiblePlan
from dnet.solver.solve import _Costs, _link, solve

GB = 10**9


def toy_model(
    layers: int, layer_bytes: int = 100, kv: int = 1, embed: int = 50, tied: bool = True
) -> ModelProfile:
    return ModelProfile(
        name="toy",
        num_layers=layers,
        layer_bytes=(layer_bytes,) * layers,
        layer_flops=(2 * layer_bytes,) * layers,
        kv_bytes_per_token=(kv,) * layers,
        embed_bytes=embed,
        head_bytes=embed if tied else 60,
        norm_bytes=4,
        head_flops=100,
        tied_embeddings=tied,
        activation_bytes=8,
    )


def brute_force(model, devices, links, context, objective, headroom=0.1):
    """Every ordered subset of devices and every composition of the layers."""
    costs = _Costs(model, context)
    n = model.num_layers
    best = None
    budgets = [int(d.memory_bytes * (1 - headroom)) for d in devices]
    for k in range(1, len(devices) + 1):
        for order in itertools.permutations(range(len(devices)), k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = [0, *cuts, n]
                ranges = list(itertools.pairwise(bounds))
                if any(
                    costs.memory(a, b) > budgets[e] for e, (a, b) in zip(order, ranges, strict=True)
                ):
                    continue
                total, worst, prev = 0.0, 0.0, HEAD
                for e, (a, b) in zip(order, ranges, strict=True):
                    size = 16 if prev == HEAD else model.activation_bytes
                    stage = costs.stage_s(devices[e], a, b) + _link(
                        links, prev, devices[e].peer_id
                    ).transfer_s(size)
                    out = _link(links, devices[e].peer_id, HEAD).transfer_s(16) if b == n else 0.0
                    total += stage + out
                    worst = max(worst, stage + out)
                    prev = devices[e].peer_id
                key = (total,) if objective == "latency" else (worst, total)
                best = key if best is None or key < best else best
    return best


@st.composite
def instances(draw):
    n_dev = draw(st.integers(1, 5))
    layers = draw(st.integers(1, 12))
    layer_bytes = draw(st.integers(10, 200))
    model = toy_model(layers, layer_bytes, kv=draw(st.integers(0, 3)), tied=draw(st.booleans()))
    total = _Costs(model, 64).memory(0, layers)
    devices = [
        DeviceProfile(
            f"p{i}",
            f"d{i}",
            memory_bytes=draw(st.integers(total // 8, total * 2)),
            bandwidth_bytes_s=draw(st.sampled_from([1e3, 5e3, 2e4, 1e5])),
            flops_s=draw(st.sampled_from([1e4, 1e5, 1e6])),
        )
        for i in range(n_dev)
    ]
    ends = [HEAD] + [d.peer_id for d in devices]
    links = {
        (a, b): LinkProfile(
            draw(st.sampled_from([0.0, 1e-3, 1e-2])), draw(st.sampled_from([1e3, 1e6]))
        )
        for a in ends
        for b in ends
        if a != b
    }
    return model, devices, links, draw(st.sampled_from(["latency", "throughput"]))


@settings(max_examples=60, deadline=None)
@given(instances())
def test_solver_matches_brute_force_and_fits(instance):
    model, devices, links, objective = instance
    expected = brute_force(model, devices, links, 64, objective)
    if expected is None:
        with pytest.raises(NoFeasiblePlan) as info:
            solve(model, devices, links, context=64, objective=objective)
        assert info.value.shortfall_bytes > 0
        return
    plan = solve(model, devices, links, context=64, objective=objective)
    key = (
        (plan.token_latency_s,)
        if objective == "latency"
        else (1 / plan.tokens_per_s, plan.token_latency_s)
    )
    assert key == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # Contiguous, complete, each device once, nothing over its budget.
    bounds = [(a.start, a.end) for a in plan.assignments]
    assert bounds[0][0] == 0 and bounds[-1][1] == model.num_layers
    assert all(x[1] == y[0] for x, y in itertools.pairwise(bounds))
    ids = [a.peer_id for a in plan.assignments]
    assert len(set(ids)) == len(ids)
    budget = {d.peer_id: d.memory_bytes * 0.9 for d in devices}
    assert all(a.memory_bytes <= budget[a.peer_id] for a in plan.assignments)
    assert {e.peer_id for e in plan.excluded} == {d.peer_id for d in devices} - set(ids)


@settings(max_examples=40, deadline=None)
@given(instances())
def test_never_slower_than_the_best_single_device(instance):
    model, devices, links, _ = instance
    singles = []
    for d in devices:
        with contextlib.suppress(NoFeasiblePlan):
            singles.append(solve(model, [d], links, context=64).token_latency_s)
    try:
        plan = solve(model, devices, links, context=64)
    except NoFeasiblePlan:
        assert not singles
        return
    if singles:
        assert plan.token_latency_s <= min(singles) + 1e-12


@settings(max_examples=40, deadline=None)
@given(instances(), st.sampled_from(["latency", "throughput"]))
def test_a_much_slower_device_never_makes_the_plan_worse(instance, objective):
    model, devices, links, _ = instance
    try:
        before = solve(model, devices, links, context=64, objective=objective)
    except NoFeasiblePlan:
        return
    snail = DeviceProfile(
        "snail", "snail", memory_bytes=10**12, bandwidth_bytes_s=1e-3, flops_s=1e-3
    )
    after = solve(model, [*devices, snail], links, context=64, objective=objective)
    assert after.cost <= before.cost + 1e-12
    assert "snail" not in {a.peer_id for a in after.assignments}
    assert any(e.peer_id == "snail" and "faster without" in e.reason for e in after.excluded)


def test_a_model_that_fits_nowhere_states_the_shortfall():
    model = toy_model(8, layer_bytes=GB)  # ~8 GB of weights
    devices = [DeviceProfile(f"p{i}", f"d{i}", 2 * GB, 1e10, 1e11) for i in range(3)]
    with pytest.raises(NoFeasiblePlan) as info:
        solve(model, devices, context=0)
    need = _Costs(model, 0).memory(0, 8)
    assert info.value.shortfall_bytes == need - 3 * int(2 * GB * 0.9)
    assert str(info.value.shortfall_bytes) in info.value.message
    # One layer bigger than any device: the shortfall is that layer's overflow.
    huge = toy_model(2, layer_bytes=5 * GB)
    with pytest.raises(NoFeasiblePlan, match="largest layer"):
        solve(huge, [DeviceProfile(f"p{i}", "d", 4 * GB, 1e10, 1e11) for i in range(4)], context=0)


def test_memory_forces_a_split_and_the_fast_device_takes_most():
    model = toy_model(10, layer_bytes=GB, embed=0)
    fast = DeviceProfile("fast", "fast", 8 * GB, 100e9, 1e12)
    slow = DeviceProfile("slow", "slow", 16 * GB, 20e9, 1e12)
    plan = solve(model, [slow, fast], context=0)
    by_id = {a.peer_id: a.end - a.start for a in plan.assignments}
    assert by_id["fast"] == 7  # 7 GB fit in 8 * 0.9 GB; the rest must go to the slow one
    assert by_id["slow"] == 3
    # The slow one could hold it all, but the fast one's share makes the split faster.
    assert plan.split_reason == "splitting is predicted faster than any single peer (latency)"
    small = DeviceProfile("slow", "slow", 8 * GB, 20e9, 1e12)
    plan = solve(model, [small, fast], context=0)
    assert plan.split_reason is not None and "no single peer can hold" in plan.split_reason
    assert "9,537 MiB" in plan.split_reason  # the whole model's 10 GB, in MiB
    # Plenty of memory on the fast one: it takes everything, the slow one is excluded.
    roomy = DeviceProfile("fast", "fast", 64 * GB, 100e9, 1e12)
    plan = solve(model, [slow, roomy], context=0)
    assert [a.peer_id for a in plan.assignments] == ["fast"]
    assert plan.excluded[0].peer_id == "slow"


def test_throughput_balances_stages():
    model = toy_model(12, layer_bytes=GB, embed=0)
    devices = [DeviceProfile(f"p{i}", f"d{i}", 64 * GB, 50e9, 1e12) for i in range(3)]
    latency = solve(model, devices, context=0, objective="latency")
    throughput = solve(model, devices, context=0, objective="throughput")
    # Links cost nothing here, so every split ties on latency; ties go to the first device.
    assert [a.peer_id for a in latency.assignments] == ["p0"]
    assert sorted(a.end - a.start for a in throughput.assignments) == [4, 4, 4]
    assert throughput.tokens_per_s > latency.tokens_per_s
    assert latency.split_reason is None
    assert (
        throughput.split_reason == "splitting is predicted faster than any single peer (throughput)"
    )


@given(
    layers=st.integers(1, 8),
    tied=st.booleans(),
    context=st.integers(0, 50),
    data=st.data(),
)
def test_slice_memory_is_what_the_solver_counts(layers, tied, context, data):
    model = toy_model(layers, layer_bytes=100, kv=3, embed=50, tied=tied)
    start = data.draw(st.integers(0, layers - 1))
    end = data.draw(st.integers(start + 1, layers))
    assert model.slice_memory(start, end, context) == _Costs(model, context).memory(start, end)
    whole = model.slice_memory(0, layers, context)
    assert whole == model.weight_bytes + 3 * layers * context


def test_deterministic():
    model = toy_model(9)
    devices = [DeviceProfile(f"p{i}", f"d{i}", 600, 1e4 * (i + 1), 1e6) for i in range(4)]
    assert solve(model, devices, context=8) == solve(model, list(devices), context=8)
