"""Sampling on the last slice: reproducible seeds, and filters that really filter."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step

from dnet.errors import InvalidSamplingParams
from dnet.models.model_dir import open_model_dir
from dnet.runtime.local import generate, load_chain
from dnet.runtime.sampler import RequestSampler, clear_argmax
from dnet.sampling import SamplingParams

N = 32


@pytest.fixture(scope="module")
def setup(tiny_model):
    path = tiny_model(arch="qwen3", dtype="float32")
    model, tokenizer = load(str(path))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    return model, prompt, load_chain(open_model_dir(path), [(0, 3), (3, 4)])


def run(chain, prompt, n=N, **params):
    return list(generate(chain, prompt, n, SamplingParams(**params)))


def ids(tokens):
    return [t.token_id for t in tokens]


def test_seeded_sampling_is_reproducible(setup, tiny_model):
    _, prompt, chain = setup
    a = ids(run(chain, prompt, temperature=1.0, seed=7))
    b = ids(run(chain, prompt, temperature=1.0, seed=7))
    c = ids(run(chain, prompt, temperature=1.0, seed=8))
    assert a == b
    assert a != c
    # The same seed through a different cut of the model: the same tokens.
    other = load_chain(
        open_model_dir(tiny_model(arch="qwen3", dtype="float32")), [(0, 1), (1, 2), (2, 4)]
    )
    assert ids(run(other, prompt, temperature=1.0, seed=7)) == a


def test_seeded_request_ignores_its_neighbours(setup):
    _, prompt, chain = setup
    alone = ids(run(chain, prompt, temperature=1.0, seed=3))
    mine = generate(chain, prompt, N, SamplingParams(temperature=1.0, seed=3))
    theirs = generate(chain, prompt[:-3], N, SamplingParams(temperature=1.0, seed=99))
    got = []
    for _ in range(N):
        got.append(next(mine).token_id)
        next(theirs)
    assert got == alone


def test_unseeded_requests_differ(setup):
    _, prompt, chain = setup
    assert ids(run(chain, prompt, temperature=1.5)) != ids(run(chain, prompt, temperature=1.5))


def test_filters_that_keep_one_token_are_greedy(setup):
    _, prompt, chain = setup
    greedy = ids(run(chain, prompt))
    hot = dict(temperature=1.5, seed=11)
    # Without a filter this temperature wanders off the greedy path...
    assert ids(run(chain, prompt, **hot)) != greedy
    # ...and each filter narrowed to one token brings it back.
    assert ids(run(chain, prompt, top_k=1, **hot)) == greedy
    assert ids(run(chain, prompt, top_p=1e-6, **hot)) == greedy
    assert ids(run(chain, prompt, min_p=1.0, **hot)) == greedy


def _ranked(token):
    return [i for i, _ in token.top_logprobs]


def test_top_k_keeps_samples_among_the_k_best(setup):
    _, prompt, chain = setup
    free = run(chain, prompt, temperature=3.0, seed=5, top_logprobs=5)
    assert any(t.token_id not in _ranked(t) for t in free), "test needs samples outside the top 5"
    kept = run(chain, prompt, temperature=3.0, seed=5, top_k=5, top_logprobs=5)
    assert all(t.token_id in _ranked(t) for t in kept)


def test_top_p_keeps_samples_inside_the_nucleus(setup):
    _, prompt, chain = setup

    def mass_above(t):
        # Probability of the tokens ranked strictly above the sampled one.
        return sum(math.exp(lp) for i, lp in t.top_logprobs if lp > t.logprob)

    free = run(chain, prompt, temperature=3.0, seed=5, top_logprobs=20)
    assert any(mass_above(t) >= 0.5 for t in free), "test needs samples outside the nucleus"
    kept = run(chain, prompt, temperature=3.0, seed=5, top_p=0.5, top_logprobs=20)
    assert all(mass_above(t) < 0.5 + 1e-6 for t in kept)


def test_min_p_drops_unlikely_tokens(setup):
    _, prompt, chain = setup

    def ratio(t):
        return math.exp(t.logprob - t.top_logprobs[0][1])

    free = run(chain, prompt, temperature=3.0, seed=5, top_logprobs=1)
    assert any(ratio(t) < 0.3 for t in free), "test needs unlikely samples"
    kept = run(chain, prompt, temperature=3.0, seed=5, min_p=0.3, top_logprobs=1)
    assert all(ratio(t) >= 0.3 - 1e-6 for t in kept)


def _repeats(prompt, generated, window):
    """Generated tokens equal to one of the ``window`` tokens before them."""
    seq = prompt + generated
    return sum(1 for i in range(len(prompt), len(seq)) if seq[i] in seq[i - window : i])


def test_repetition_penalty_stops_repeats(setup):
    _, prompt, chain = setup
    n = 48
    plain = ids(run(chain, prompt, n=n))
    assert _repeats(prompt, plain, 20) > 0, "test needs a greedy run that repeats"
    penalised = ids(run(chain, prompt, n=n, repetition_penalty=50.0, repetition_context_size=20))
    assert _repeats(prompt, penalised, 20) == 0


def test_logprobs_match_mlx_lm(setup):
    model, prompt, chain = setup
    ref = list(generate_step(mx.array(prompt), model, max_tokens=8))
    got = run(chain, prompt, n=8, top_logprobs=3)
    for (tok, logprobs), t in zip(ref, got, strict=True):
        assert t.token_id == int(tok)
        assert t.logprob == pytest.approx(logprobs[int(tok)].item(), abs=1e-4)
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0][0] == t.token_id  # greedy: the best is the chosen
        values = [lp for _, lp in t.top_logprobs]
        assert values == sorted(values, reverse=True)
        best = mx.argsort(-logprobs)[:3].tolist()
        assert [i for i, _ in t.top_logprobs] == best


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(min_p=1.5),
        dict(repetition_penalty=0.0),
        dict(seed=-1),
        dict(top_logprobs=21),
        dict(repetition_context_size=0),
    ],
)
def test_invalid_params_are_refused(bad):
    with pytest.raises(InvalidSamplingParams):
        SamplingParams(**bad)


def _mlx_lm_greedy(logits):
    return int(mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1).item())


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_greedy_without_logprobs_picks_mlx_lm_token(dtype):
    """The raw argmax is taken only where it provably is mlx_lm's token; near-ties
    go through the normalised logits. Both paths must be taken here."""
    rng = mx.random.key(0)
    fast = slow = 0
    for i in range(150):
        rng, k1, k2 = mx.random.split(rng, 3)
        vocab = [50, 3000, 151936][i % 3]
        scale = [0.01, 1.0, 8.0][(i // 3) % 3]
        logits = (mx.random.normal((1, vocab), key=k1) * scale).astype(dtype)
        if i % 5 == 0:  # a near-tie: the runner-up one step below the best
            best = int(mx.argmax(logits).item())
            other = (best + 1 + int(mx.random.randint(0, vocab - 1, key=k2).item())) % vocab
            below = mx.array(np.nextafter(np.float32(logits[0, best].item()), -np.inf))
            logits[0, other] = below.astype(dtype)
        sampler = RequestSampler(SamplingParams(), [])
        token = sampler.sample(logits)
        assert token.token_id == _mlx_lm_greedy(logits)
        assert token.logprob is None
        if clear_argmax(logits) is None:
            slow += 1
        else:
            fast += 1
    assert fast > 0 and slow > 0


def test_greedy_near_tie_follows_mlx_lm_not_the_raw_argmax():
    # bfloat16: 1000 runners-up just under the best. The normalised values round
    # together, and mlx_lm picks the first of them; the raw argmax would not.
    values = np.full((1, 1001), -20.0, dtype=np.float32)
    values[0, :1000] = 0.99609375
    values[0, 1000] = 1.0
    logits = mx.array(values).astype(mx.bfloat16)
    assert int(mx.argmax(logits).item()) == 1000
    want = _mlx_lm_greedy(logits)
    assert want != 1000, "test needs a case where rounding changes the argmax"
    assert clear_argmax(logits) is None
    assert RequestSampler(SamplingParams(), []).sample(logits).token_id == want


def test_logprobs_only_when_asked(setup):
    _, prompt, chain = setup
    plain = run(chain, prompt, n=4)
    asked = run(chain, prompt, n=4, logprobs=True)
    assert ids(plain) == ids(asked)
    assert all(t.logprob is None for t in plain)
    assert all(t.logprob is not None and t.logprob <= 0 for t in asked)
