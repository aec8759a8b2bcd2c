"""Decode lanes: stable rows, one step in flight per lane, joins at the end."""

from __future__ import annotations

import pytest

from dnet.head.lanes import Lanes
from dnet.head.loaded_ring import machines


def test_one_lane_batches_everyone_and_keeps_row_order():
    lanes = Lanes(1)
    lanes.join("a", 10, 100)
    (plan,) = lanes.ready()
    assert plan.request_ids == ("a",) and plan.positions == (10,) and plan.tokens == (100,)
    lanes.join("b", 5, 200)  # joins while a's step is out: waits for the next one
    assert lanes.ready() == []
    assert lanes.finished(plan.step, [("a", 101, False)]) == []
    (plan,) = lanes.ready()
    assert plan.request_ids == ("a", "b") and plan.positions == (11, 5)
    assert plan.tokens == (101, 200)
    lanes.join("c", 7, 300)
    assert lanes.finished(plan.step, [("b", 201, False), ("a", 102, True)]) == []
    (plan,) = lanes.ready()
    assert plan.request_ids == ("b", "c") and plan.tokens == (201, 300)
    assert "a" not in lanes


def test_lanes_fill_evenly_and_step_independently():
    lanes = Lanes(2)
    for i, rid in enumerate("abcd"):
        lanes.join(rid, i, i)
    assert lanes.sizes() == [2, 2]
    first, second = lanes.ready()
    assert first.request_ids == ("a", "c") and second.request_ids == ("b", "d")
    assert lanes.finished(second.step, [("b", 1, False), ("d", 1, False)]) == []
    (again,) = lanes.ready()
    assert again.request_ids == ("b", "d") and again.step not in (first.step, second.step)


def test_missing_rows_are_reported_and_stale_steps_ignored():
    lanes = Lanes(1)
    lanes.join("a", 0, 1)
    lanes.join("b", 0, 1)
    (plan,) = lanes.ready()
    assert lanes.finished(plan.step, [("a", 2, False)]) == ["b"]
    assert lanes.finished(plan.step, [("a", 2, False)]) == []  # already over
    lanes.leave("b")
    (plan,) = lanes.ready()
    assert plan.request_ids == ("a",)


def test_a_step_whose_rows_all_left_frees_its_lane():
    lanes = Lanes(1)
    lanes.join("a", 0, 1)
    (old,) = lanes.ready()
    lanes.leave("a")
    lanes.join("b", 3, 9)
    (new,) = lanes.ready()
    assert new.request_ids == ("b",)
    assert lanes.finished(old.step, [("a", 5, False)]) == []  # stale: not b's step
    assert lanes.ready() == []
    with pytest.raises(ValueError):
        lanes.join("b", 0, 0)


def test_machines_counts_hosts():
    assert machines(["127.0.0.1:1", "127.0.0.1:2"]) == 1
    assert machines(["10.0.0.1:1", "10.0.0.2:1", "[::1]:5", "[::1]:6"]) == 3
