"""Batched decode steps: several requests as one batch through each slice, with rows
joining, leaving and running alone in between, give each request exactly the
tokens mlx_lm gives it alone."""

from __future__ import annotations

import numpy as np
import pytest
from mlx_lm import load

from dnet.errors import InvalidActivation
from dnet.models.model_dir import open_model_dir
from dnet.runtime.local import load_chain
from dnet.sampling import SampledToken
from dnet.tensor import HostTensor
from tests.runtime.test_parity import reference_tokens

NEW = 12


def _prompts(tokenizer, n):
    texts = ["a fox", "the crow sat on a branch", "once", "tell me a long story about bears"]
    return [tokenizer.encode(texts[i % len(texts)] + " " * (i // len(texts))) for i in range(n)]


class _Driver:
    """Runs requests through a chain of engines: prefill alone, then batched steps."""

    def __init__(self, engines):
        self.engines = engines
        self.tokens: dict[str, list[int]] = {}
        self.position: dict[str, int] = {}

    def start(self, rid, prompt):
        x: object = prompt
        for e in self.engines:
            e.start(rid)
            x = e.run(rid, x)
        assert isinstance(x, SampledToken)
        self.tokens[rid] = [x.token_id]
        self.position[rid] = len(prompt)

    def step(self, rids):
        positions = [self.position[r] for r in rids]
        ids = np.array([[self.tokens[r][-1]] for r in rids], dtype="<i4")
        x: object = HostTensor("int32", ids.shape, ids.tobytes())
        for e in self.engines:
            result = e.step(rids, positions, x)
            assert not result.dropped and list(result.request_ids) == list(rids)
            x = result.output
        for rid, token in zip(rids, x, strict=True):
            self.tokens[rid].append(token.token_id)
            self.position[rid] += 1

    def end(self, rid):
        for e in self.engines:
            e.end(rid)


@pytest.mark.parametrize("arch", ["qwen3", "deepseek_v2"])
def test_batched_steps_with_changing_rows_match_mlx_lm_alone(tiny_model, arch):
    path = tiny_model(arch=arch)
    model, tokenizer = load(str(path))
    prompts = _prompts(tokenizer, 5)
    expected = [reference_tokens(model, p, NEW + 1) for p in prompts]
    engines = load_chain(open_model_dir(path), [(0, 2), (2, 4)])
    if arch == "qwen3":
        assert all(e.batching for e in engines)
    d = _Driver(engines)
    for i in range(3):
        d.start(f"r{i}", prompts[i])
    for _ in range(3):
        d.step(["r0", "r1", "r2"])  # the same rows: the batch is reused
    d.step(["r0", "r2"])  # r1 runs alone for a while
    d.step(["r1"])
    d.step(["r1"])
    d.step(["r0", "r2", "r1"])  # and joins again at the end
    d.end("r2")  # r2 leaves; r3 joins after its prefill
    d.start("r3", prompts[3])
    d.step(["r0", "r1", "r3"])
    d.step(["r3", "r0", "r1"])  # another order: the batch is rebuilt
    d.start("r4", prompts[4])
    while any(len(d.tokens[r]) < NEW + 1 for r in ("r0", "r1", "r3", "r4")):
        d.step([r for r in ("r0", "r1", "r3", "r4") if len(d.tokens[r]) < NEW + 1])
    for i in (0, 1, 3, 4):
        assert d.tokens[f"r{i}"] == expected[i], f"request {i}"
    assert d.tokens["r2"] == expected[2][: len(d.tokens["r2"])]
    for rid in ("r0", "r1", "r3", "r4"):
        d.end(rid)
    assert all(e.statistics().requests == 0 and e.kv_bytes() == 0 for e in engines)


def test_bad_rows_are_dropped_and_the_rest_run(tiny_model):
    path = tiny_model(arch="qwen3")
    model, tokenizer = load(str(path))
    prompts = _prompts(tokenizer, 2)
    expected = [reference_tokens(model, p, 3) for p in prompts]
    engines = load_chain(open_model_dir(path), [(0, 4)])
    d = _Driver(engines)
    d.start("a", prompts[0])
    d.start("b", prompts[1])
    (engine,) = engines
    ids = np.array([[d.tokens["a"][-1]], [7], [d.tokens["b"][-1]]], dtype="<i4")
    result = engine.step(
        ["a", "gone", "b"],
        [d.position["a"], 0, d.position["b"] + 5],
        HostTensor("int32", ids.shape, ids.tobytes()),
    )
    assert result.request_ids == ("a",)
    assert [rid for rid, _ in result.dropped] == ["gone", "b"]
    assert [type(e).__name__ for _, e in result.dropped] == ["UnknownRequest", "PositionMismatch"]
    d.tokens["a"].append(result.output[0].token_id)
    d.position["a"] += 1
    d.step(["a", "b"])
    assert d.tokens["a"] == expected[0] and d.tokens["b"] == expected[1][:2]
    with pytest.raises(InvalidActivation, match=r"\[2, 1"):
        engine.step(
            ["a", "b"], [d.position["a"], d.position["b"]], HostTensor("int32", (1, 1), bytes(4))
        )
    with pytest.raises(InvalidActivation, match="distinct"):
        engine.step(["a", "a"], [1, 1], HostTensor("int32", (2, 1), bytes(8)))


def test_a_chunk_paused_between_layers_for_steps_changes_no_ones_tokens(tiny_model):
    """A prefill chunk run a layer at a time, with batched steps of other requests
    run between its layers, gives the same tokens as everything run in turn."""
    path = tiny_model(arch="qwen3")
    model, tokenizer = load(str(path))
    prompts = _prompts(tokenizer, 3)
    long_prompt = tokenizer.encode("tell me a long story about bears and a fox " * 3)
    expected = [reference_tokens(model, p, 6) for p in prompts[:2]]
    expected_long = reference_tokens(model, long_prompt, 3)
    engines = load_chain(open_model_dir(path), [(0, 2), (2, 4)])
    d = _Driver(engines)
    d.start("a", prompts[0])
    d.start("b", prompts[1])
    x: object = long_prompt
    pauses = 0
    for e in engines:
        e.start("long")
        chunk = e.begin("long", x)
        while not chunk.advance(pause=lambda: True):
            pauses += 1
            d.step(["a", "b"])  # other requests' steps between two layers
        assert chunk.done
        x = chunk.output
    assert pauses == 2  # one between the two layers of each slice
    assert isinstance(x, SampledToken) and x.token_id == expected_long[0]
    while len(d.tokens["a"]) < 6:
        d.step(["a", "b"])
    assert d.tokens["a"] == expected[0] and d.tokens["b"] == expected[1]
    d.tokens["long"], d.position["long"] = [x.token_id], len(long_prompt)
    d.step(["long", "a", "b"])
    d.step(["long"])
    assert d.tokens["long"] == expected_long
    for rid in ("a", "b", "long"):
        d.end(rid)
    assert all(e.kv_bytes() == 0 for e in engines)
