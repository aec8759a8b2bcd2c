"""Per-request state around a slice: caches, positions, errors, accounting."""

from __future__ import annotations

import numpy as np
import pytest

from dnet.errors import (
    ContextOverflow,
    DuplicateRequest,
    InvalidActivation,
    PositionMismatch,
    UnknownRequest,
)
from dnet.models.model_dir import open_model_dir
from dnet.runtime.engine import SliceEngine
from dnet.runtime.local import generate, load_chain
from dnet.runtime.slice import load_slice
from dnet.sampling import SampledToken, SamplingParams
from dnet.tensor import HostTensor


@pytest.fixture
def chain(tiny_model):
    return load_chain(open_model_dir(tiny_model(arch="qwen3")), [(0, 2), (2, 4)])


def test_bad_inputs_get_clear_errors_and_break_nothing(chain):
    first, last = chain
    for e in chain:
        e.start("r")
    with pytest.raises(InvalidActivation, match="token id out of range"):
        first.run("r", [1, 2, 100_000])
    with pytest.raises(InvalidActivation, match="int32"):
        first.run("r", HostTensor("float32", (1, 2), bytes(8)))
    with pytest.raises(InvalidActivation, match="activations"):
        last.run("r", [1, 2, 3])
    with pytest.raises(InvalidActivation, match=r"bfloat16|float32"):
        last.run("r", HostTensor("float16", (1, 3, 64), bytes(3 * 64 * 2)))
    with pytest.raises(InvalidActivation, match="64"):
        last.run("r", HostTensor("float32", (1, 3, 32), bytes(3 * 32 * 4)))
    with pytest.raises(InvalidActivation):
        HostTensor("float32", (1, 3, 64), bytes(7))
    with pytest.raises(InvalidActivation):
        HostTensor("complex64", (1,), bytes(8))
    with pytest.raises(UnknownRequest):
        first.run("nobody", [1, 2])
    with pytest.raises(UnknownRequest):
        first.trim("nobody", 1)
    with pytest.raises(DuplicateRequest):
        first.start("r")
    # None of that moved the request: it still runs from position 0.
    assert first.position("r") == 0 and last.position("r") == 0
    x = first.run("r", [1, 2, 3], position=0)
    assert isinstance(x, HostTensor) and x.shape == (1, 3, 64)
    with pytest.raises(PositionMismatch):
        last.run("r", x, position=5)
    token = last.run("r", x, position=0)
    assert isinstance(token, SampledToken)
    assert first.position("r") == last.position("r") == 3


def test_kv_caches_extend_trim_free_and_are_accounted(chain):
    first, last = chain
    assert first.kv_bytes() == 0
    for e in chain:
        e.start("a")
        e.start("b")
    x = first.run("a", list(range(10)))
    last.run("a", x)
    one = first.kv_bytes("a")
    assert one > 0 and first.kv_bytes("b") == 0
    assert first.kv_bytes() == one
    # 2 layers x (keys + values) x 2 kv heads x 16 dims x float32 x 256 positions
    assert one == 2 * 2 * 2 * 16 * 4 * 256
    assert first.statistics().requests == 2
    assert first.trim("a", 4) == 4 and first.position("a") == 6
    assert last.trim("a", 100) == 10 and last.position("a") == 0
    first.end("a")
    first.end("a")  # ending twice is harmless: end and cancel may race
    assert first.kv_bytes() == 0 and first.request_ids() == ["b"]


def test_trim_then_regenerate_matches(chain):
    first, last = chain
    prompt = [5, 17, 33, 250, 7, 91]
    for e in chain:
        e.start("r", SamplingParams(logprobs=True))
    x = first.run("r", prompt[:-1])
    last.run("r", x, sample=False)
    x = first.run("r", prompt[-1:])
    t1 = last.run("r", x)
    # Trim the last position everywhere and run it again: the same token.
    for e in chain:
        e.trim("r", 1)
    x = first.run("r", prompt[-1:], position=len(prompt) - 1)
    t2 = last.run("r", x)
    assert t1.token_id == t2.token_id
    assert t1.logprob == pytest.approx(t2.logprob, abs=1e-5)


def test_context_limit(tiny_model):
    info = open_model_dir(tiny_model(arch="qwen3"))
    (engine,) = load_chain(info, [(0, 4)])
    engine.start("r", max_context=8)
    engine.run("r", list(range(6)), sample=False)
    with pytest.raises(ContextOverflow):
        engine.run("r", list(range(3)))
    assert engine.position("r") == 6


def test_idle_requests_expire(tiny_model):
    now = [1000.0]
    info = open_model_dir(tiny_model(arch="qwen3"))
    engine = SliceEngine(load_slice(info, 0, 2), clock=lambda: now[0])
    engine.start("old")
    now[0] += 50
    engine.start("new")
    engine.run("new", [1, 2])
    now[0] += 30
    assert engine.expire_idle(60.0) == ["old"]
    assert engine.request_ids() == ["new"]
    now[0] += 31
    assert engine.expire_idle(60.0) == ["new"]


def test_interleaved_requests_do_not_disturb_each_other(chain):
    prompts = [[5, 9, 13, 200, 4], [300, 2, 2, 41, 41, 41, 7]]
    alone = [[t.token_id for t in generate(chain, p, 12)] for p in prompts]
    gens = [generate(chain, p, 12) for p in prompts]
    together: list[list[int]] = [[], []]
    for _ in range(12):
        for i, g in enumerate(gens):
            together[i].append(next(g).token_id)
    assert together == alone


def test_logits_only_on_last_slice(chain):
    first, last = chain
    for e in chain:
        e.start("r")
    with pytest.raises(InvalidActivation):
        first.logits("r", [1, 2])
    x = first.run("r", [1, 2])
    logits = last.logits("r", x)
    assert logits.dtype == "float32" and logits.shape == (1, last.slice.vocab_size)
    values = np.frombuffer(logits.data, dtype="<f4")
    assert np.isfinite(values).all()
