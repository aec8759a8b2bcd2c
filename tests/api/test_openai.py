"""The official ``openai`` client against a real head and two real peers; greedy
answers compared with ``mlx_lm.generate`` on the whole model, in the same test."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import httpx
import pytest
from openai import OpenAI

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about the fox and the crow."},
]


@cache
def _mlx_lm(path: str):
    from mlx_lm import load

    return load(path)


def reference(path, prompt_ids: list[int], max_tokens: int) -> str:
    from mlx_lm import generate

    model, tokenizer = _mlx_lm(str(path))
    return generate(model, tokenizer, prompt_ids, max_tokens=max_tokens)


def chat_ids(path, messages) -> list[int]:
    _, tokenizer = _mlx_lm(str(path))
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def client(cluster) -> OpenAI:
    return OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list_names_the_loaded_model(cluster):
    models = client(cluster).models.list().data
    assert [m.id for m in models] == [str(cluster.model)]
    assert models[0].owned_by == "dnet"


def test_chat_greedy_equals_mlx_lm_generate(cluster):
    got = client(cluster).chat.completions.create(
        model=str(cluster.model), messages=MESSAGES, max_tokens=24, temperature=0
    )
    ids = chat_ids(cluster.model, MESSAGES)
    assert got.choices[0].message.content == reference(cluster.model, ids, 24)
    assert got.choices[0].message.role == "assistant"
    assert got.object == "chat.completion" and got.id.startswith("chatcmpl-")
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.choices[0].finish_reason in ("stop", "length")
    if got.choices[0].finish_reason == "length":
        assert got.usage.completion_tokens == 24


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(cluster):
    c = client(cluster)
    whole = c.chat.completions.create(
        model=str(cluster.model), messages=MESSAGES, max_tokens=20, temperature=0
    )
    chunks = list(
        c.chat.completions.create(
            model=str(cluster.model),
            messages=MESSAGES,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1


def test_completions_greedy_equals_mlx_lm_plain_and_streamed(cluster):
    c = client(cluster)
    prompt = "Once upon a time, a fox"
    _, tokenizer = _mlx_lm(str(cluster.model))
    expected = reference(cluster.model, tokenizer.encode(prompt), 16)
    got = c.completions.create(
        model=str(cluster.model), prompt=prompt, max_tokens=16, temperature=0
    )
    assert got.choices[0].text == expected
    assert got.object == "text_completion"
    assert got.usage.prompt_tokens == len(tokenizer.encode(prompt))
    streamed = c.completions.create(
        model=str(cluster.model), prompt=prompt, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed) == expected
    echoed = c.completions.create(
        model=str(cluster.model), prompt=prompt, max_tokens=16, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompt + expected
    echoed_stream = c.completions.create(
        model=str(cluster.model),
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        echo=True,
        stream=True,
    )
    assert "".join(ch.choices[0].text for ch in echoed_stream) == prompt + expected


def test_chat_logprobs_in_openai_shape(cluster):
    got = client(cluster).chat.completions.create(
        model=str(cluster.model),
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = got.choices[0].logprobs.content
    scored = got.usage.completion_tokens - (got.choices[0].finish_reason == "stop")
    assert len(content) == scored
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        # Greedy: the chosen token is the most likely one, with the same logprob.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    # The tokens' bytes are the answer's bytes (a character may span tokens).
    if got.choices[0].finish_reason == "length":
        joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
        assert joined == got.choices[0].message.content


def test_completion_logprobs_in_legacy_shape(cluster):
    got = client(cluster).completions.create(
        model=str(cluster.model), prompt="The crow", max_tokens=6, temperature=0, logprobs=2
    )
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)


def test_sixteen_concurrent_streams_all_get_their_own_answers(cluster):
    questions = [f"Question {i}: what did the crow drop?" for i in range(4)]
    expected = {
        q: reference(cluster.model, chat_ids(cluster.model, [{"role": "user", "content": q}]), 12)
        for q in questions
    }
    c = client(cluster)

    def ask(i: int) -> tuple[str, str, int]:
        q = questions[i % 4]
        stream = c.chat.completions.create(
            model=str(cluster.model),
            messages=[{"role": "user", "content": q}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        return q, text, chunks[-1].usage.completion_tokens

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16), timeout=120))
    assert len(results) == 16
    for q, text, used in results:
        assert text == expected[q]
        assert 1 <= used <= 12
    assert time.monotonic() - started < 120
    cluster.wait(lambda: cluster.peer_active() == [0, 0], 5, "every peer is idle again")


def test_a_client_that_disconnects_mid_stream_frees_every_peer(cluster):
    body = {
        "model": str(cluster.model),
        "messages": MESSAGES,
        "max_tokens": 3000,
        "temperature": 0.8,
        "seed": 3,
        "stream": True,
    }
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", cluster.url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("data: ")
            if seen >= 5:
                break
        # Generating now: the request is live on every peer of the ring.
        assert cluster.peer_active() == [1, 1]
    # The response is closed: the client went away mid-stream.
    cluster.wait(lambda: cluster.peer_active() == [0, 0], 5, "every peer freed the request")
    cluster.wait(
        lambda: cluster.get("/v1/status").json()["head"]["active_requests"] == 0,
        5,
        "the head's slot is free",
    )
    # Freed by the disconnect, not by running to the end.
    assert cluster.get("/v1/status").json()["head"]["tokens_generated"] < 3000
